"""Reports: HTML pages and plots."""
