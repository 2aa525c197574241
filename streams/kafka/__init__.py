"""Kafka plumbing: the local broker, the declared topics and client settings."""
