"""Stream processors: thin Kafka adapters around the pure domain code."""
