"""The HTTP gateway and the gemma-jobs command line."""
