"""The one stream runtime: consume, transact, commit, rebalance, event-time alignment,
state store + changelog, dead letters. Processors run on it."""
