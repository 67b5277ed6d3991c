# GRUB for BIOS on GPT (the bootloader element installs grub-pc into the BIOS boot
# partition); the UEFI loader is written by cleanup.d/90-block-device-hybrid-esp.
export DIB_BLOCK_DEVICE=gpt
