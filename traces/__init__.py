"""agentsim.traces."""
