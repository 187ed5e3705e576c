"""agentsim.experiments."""
