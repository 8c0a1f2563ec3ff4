"""Code shared by the gateway and the workers; never imports torch."""
