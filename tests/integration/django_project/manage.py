#!/usr/bin/env python
"""manage.py of the tiny Django project the pgreuse tests run Django's own test runner on."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproject.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
