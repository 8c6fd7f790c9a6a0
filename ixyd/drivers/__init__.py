"""NIC drivers on the device seam: one module per NIC family."""
