"""The admin, and the JSON views of the orders app."""

from django.contrib import admin
from django.urls import path
from orders import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("products/", views.products),
    path("orders/", views.orders),
    path("orders/summary/", views.summary),
]
