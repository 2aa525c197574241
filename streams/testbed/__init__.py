"""The test bed: checks, benchmarks and fault injection that judge the product from
outside. Never imported by the product itself."""
