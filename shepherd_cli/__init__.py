"""`shepherd`: the operator's command line (serve the services, inspect and steer tasks)."""
