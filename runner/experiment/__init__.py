"""`dipo experiment`: arms x seeds runs with identical data order, held-out evaluation and a comparison report."""
