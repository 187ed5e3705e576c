"""agentsim.live."""
