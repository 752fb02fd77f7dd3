"""Research tooling, not part of the package (sweeps, bench, diagnostics, reports)."""
