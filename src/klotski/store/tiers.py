"""The memory tiers a weight unit can live on, fastest first."""

DEVICE, HOST, DISK = "device", "host", "disk"
TIERS = (DEVICE, HOST, DISK)
