"""agentsim.sim."""
