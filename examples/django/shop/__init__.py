"""The shop example's Django project: settings, URLs, WSGI entry point."""
