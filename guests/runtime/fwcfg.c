/* fw_cfg, QEMU's port interface: 16-bit selector write, byte-wise data reads. */
#include "rt.h"

void fwcfg_select(uint16_t key)
{
    outw(PYKVM_PORT_FWCFG_CTL, key);
}

void fwcfg_read(void *buf, size_t n)
{
    uint8_t *p = buf;
    while (n--)
        *p++ = inb(PYKVM_PORT_FWCFG_DATA);
}

void fwcfg_read_item(uint16_t key, void *buf, size_t n)
{
    fwcfg_select(key);
    fwcfg_read(buf, n);
}

static uint64_t read_le(uint16_t key, size_t n)
{
    uint8_t b[8];
    uint64_t v = 0;
    fwcfg_read_item(key, b, n);
    while (n--)
        v = (v << 8) | b[n];
    return v;
}

uint16_t fwcfg_read16(uint16_t key) { return (uint16_t)read_le(key, 2); }
uint32_t fwcfg_read32(uint16_t key) { return (uint32_t)read_le(key, 4); }
uint64_t fwcfg_read64(uint16_t key) { return read_le(key, 8); }

int fwcfg_present(void)
{
    char sig[4];
    fwcfg_read_item(PYKVM_FWCFG_SIGNATURE, sig, sizeof(sig));
    return memcmp(sig, "QEMU", 4) == 0;
}
