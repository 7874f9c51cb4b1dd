"""Serving: the OpenAI-compatible API at every node, routing, tunneling to hosts, failover."""
