"""The request front: everything a request goes through before it is queued."""
