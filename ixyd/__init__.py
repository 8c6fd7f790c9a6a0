"""ixyd: a user-space driver daemon for Intel ixgbe 10 GbE NICs over VFIO.

Layers, each importing only the ones below it:
    drivers (ixgbe)  ->  device seam (device.py) + DMA memory (dma.py)  <-  backends (model/, vfio)
"""

__version__ = "0.1.0"
