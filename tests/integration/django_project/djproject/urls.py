"""The admin, and two views that read and write notes."""

from django.contrib import admin
from django.urls import path
from notes import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("notes/", views.notes),
]
