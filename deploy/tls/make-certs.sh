#!/bin/sh
# A private CA and the two certificates that Redis over mutual TLS needs, for Compose and Kubernetes alike:
#   deploy/tls/make-certs.sh [OUT]        (OUT defaults to this folder; needs OpenSSL 1.1.1+ or 3)
# writes
#   OUT/ca/ca.crt, OUT/ca/ca.key          the CA (keep ca.key offline; it is needed again only to issue certificates)
#   OUT/redis/{ca.crt,tls.crt,tls.key}    the Redis server: CN redis, names redis, redis.$NAMESPACE[.svc[.cluster.local]],
#                                         localhost, 127.0.0.1; usable as a client too (its own healthcheck uses it)
#   OUT/client/{ca.crt,tls.crt,tls.key}   the one client certificate the learner, reward and rollout services share
# Compose mounts OUT/redis and OUT/client (deploy/docker/compose.tls.yaml); Kubernetes takes them as the secrets
# dipo-redis-tls and dipo-redis-client-tls (deploy/k8s/overlays/tls). Nothing here is committed (see .gitignore).
#
# Permissions: OUT itself is 0700, so other users of this machine cannot read a key. The client key is 0644 inside
# it because the dipo images run as uid 10001, which must read it through the Compose bind mount; the Redis key
# stays 0600 (the Compose redis container runs as root).
#
# Environment: NAMESPACE (dipo), DAYS (825, the certificates), CA_DAYS (3650). An existing CA in OUT/ca is reused,
# so running the script again renews the server and client certificates without touching what trusts the CA.
set -eu

OUT="${1:-$(dirname "$0")}"
NAMESPACE="${NAMESPACE:-dipo}"
DAYS="${DAYS:-825}"
CA_DAYS="${CA_DAYS:-3650}"
# P-256 keys: small, fast, and accepted by Redis, OpenSSL and Python's ssl module.
KEY="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"

umask 077
mkdir -p "$OUT/ca" "$OUT/redis" "$OUT/client"
chmod 0700 "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# A minimal OpenSSL config, so the result does not depend on the system's openssl.cnf.
cat > "$WORK/req.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = dipo redis CA
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF

if [ ! -s "$OUT/ca/ca.key" ]; then
  # shellcheck disable=SC2086 # KEY is a list of options
  openssl req -x509 -new $KEY -config "$WORK/req.cnf" -extensions v3_ca -days "$CA_DAYS" \
    -keyout "$OUT/ca/ca.key" -out "$OUT/ca/ca.crt" 2>/dev/null
fi

# issue NAME CN EXTENDED_KEY_USAGE SUBJECT_ALT_NAMES: a key, and a certificate the CA signs, in OUT/NAME.
issue() {
  printf '[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = %s\n' "$2" > "$WORK/$1.cnf"
  {
    echo "basicConstraints = critical, CA:FALSE"
    echo "keyUsage = critical, digitalSignature, keyEncipherment"
    echo "extendedKeyUsage = $3"
    echo "subjectKeyIdentifier = hash"
    echo "authorityKeyIdentifier = keyid:always"
    if [ -n "$4" ]; then echo "subjectAltName = $4"; fi
  } > "$WORK/$1.ext"
  # shellcheck disable=SC2086
  openssl req -new $KEY -config "$WORK/$1.cnf" -keyout "$OUT/$1/tls.key" -out "$WORK/$1.csr" 2>/dev/null
  openssl x509 -req -in "$WORK/$1.csr" -CA "$OUT/ca/ca.crt" -CAkey "$OUT/ca/ca.key" -CAcreateserial \
    -CAserial "$WORK/ca.srl" -days "$DAYS" -extfile "$WORK/$1.ext" -out "$OUT/$1/tls.crt" 2>/dev/null
  cp "$OUT/ca/ca.crt" "$OUT/$1/ca.crt"
  # Strict, as Python 3.13+ verifies by default (key usage on the CA, key identifiers).
  openssl verify -x509_strict -CAfile "$OUT/ca/ca.crt" "$OUT/$1/tls.crt" > /dev/null
}

SVC="redis.$NAMESPACE.svc"
issue redis redis "serverAuth, clientAuth" \
  "DNS:redis, DNS:redis.$NAMESPACE, DNS:$SVC, DNS:$SVC.cluster.local, DNS:localhost, IP:127.0.0.1"
issue client dipo "clientAuth" ""

chmod 0755 "$OUT/client"
chmod 0644 "$OUT/client/ca.crt" "$OUT/client/tls.crt" "$OUT/client/tls.key"
chmod 0700 "$OUT/redis"
chmod 0600 "$OUT/redis/tls.key"
echo "certificates for Redis over mutual TLS in $OUT (valid for $DAYS days):"
echo "  $OUT/redis   (the server)    $OUT/client   (learner, reward, rollout)"
