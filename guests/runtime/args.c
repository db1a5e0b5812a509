/* key=value words of the kernel command line (see rt.h). */
#include "rt.h"

int arg_str(const char *cmdline, const char *key, char *out, size_t max)
{
    size_t klen = strlen(key);
    const char *p = cmdline;
    while (p && *p) {
        while (*p == ' ')
            p++;
        const char *end = p;
        while (*end && *end != ' ')
            end++;
        if ((size_t)(end - p) > klen && !strncmp(p, key, klen) && p[klen] == '=') {
            size_t n = (size_t)(end - p) - klen - 1;
            if (max) {
                if (n >= max)
                    n = max - 1;
                memcpy(out, p + klen + 1, n);
                out[n] = 0;
            }
            return 1;
        }
        p = end;
    }
    return 0;
}

uint64_t arg_u64(const char *cmdline, const char *key, uint64_t def)
{
    char buf[24];
    if (!arg_str(cmdline, key, buf, sizeof(buf)))
        return def;
    uint64_t v = 0;
    int base = 10;
    const char *s = buf;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (; *s; s++) {
        int d = *s >= '0' && *s <= '9' ? *s - '0'
              : base == 16 && *s >= 'a' && *s <= 'f' ? *s - 'a' + 10
              : base == 16 && *s >= 'A' && *s <= 'F' ? *s - 'A' + 10 : -1;
        if (d < 0)
            return def;
        v = v * (uint64_t)base + (uint64_t)d;
    }
    return v;
}

int arg_versions(const char *cmdline, const char *key, uint32_t *out, int max)
{
    char buf[96];
    if (!arg_str(cmdline, key, buf, sizeof(buf)))
        return 0;
    int n = 0;
    const char *s = buf;
    while (*s && n < max) {
        uint32_t major = 0, minor = 0, digits = 0;
        for (; *s >= '0' && *s <= '9' && digits < 6; s++, digits++)
            major = major * 10 + (uint32_t)(*s - '0');
        if (!digits || *s++ != '.')
            return -1;
        for (digits = 0; *s >= '0' && *s <= '9' && digits < 6; s++, digits++)
            minor = minor * 10 + (uint32_t)(*s - '0');
        if (!digits || major > 0xffff || minor > 0xffff || (*s && *s != ','))
            return -1;
        out[n++] = major << 16 | minor;
        if (*s == ',')
            s++;
    }
    return *s ? -1 : n;
}
