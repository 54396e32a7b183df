"""The operator console: web pages under ``/console`` for the people who run the gateway (docs/console.md)."""
