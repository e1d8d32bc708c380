"""The files worker (issue 16): files and images sent in chunks through the broker, kept by content."""
