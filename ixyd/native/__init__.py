"""Native (C) datapath: mempool, descriptor rings and the forwarding loop, built with cffi."""
