"""agentsim.policies."""
