"""Services: what the agent does (VM lifecycle, devices, checkpoints, disks, networks,
jobs), stated as intentions over the drivers and the store. Nothing here knows HTTP."""
