"""The HTTP ingestion API: JSON over HTTP into the billing topics, per tenant."""
