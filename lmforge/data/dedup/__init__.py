"""De-duplication and decontamination steps (exact, MinHash-LSH, repeated lines, C4 spans, eval n-grams)."""
