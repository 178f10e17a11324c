"""Test and benchmark fixtures that ship with the package (so benchmarks need no path tricks):
``cases`` holds the op's shapes and popularity cases (punica's grid, scaled down)."""
