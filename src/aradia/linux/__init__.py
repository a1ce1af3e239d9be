"""Linux semantics recovered from guest memory."""
