"""End-to-end experiments built from the packages below: the demo."""
