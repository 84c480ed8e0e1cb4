"""The one verifier: the ledger of adapter tensors, the exact merge in float64 and its tolerances, the weight and
output checks, combined adapters against their sources, quantized merges against their budgets, and the verdict.
Used by `merge` (every backend), `verify`, the tests, the matrix and fingerprints."""
