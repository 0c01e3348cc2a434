"""A tiny Django project on ``ENGINE: "pgreuse.django"``, for tests/integration/test_django.py."""
