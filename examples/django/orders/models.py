"""A product has a stock; an order takes a quantity of one product."""

from django.db import models


class Product(models.Model):
    name = models.CharField(max_length=100, unique=True)
    stock = models.PositiveIntegerField()

    def __str__(self) -> str:
        return self.name


class Order(models.Model):
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="orders")
    quantity = models.PositiveIntegerField()
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.quantity} x {self.product.name}"
