#!/usr/bin/env bash
# Builds a mock libnvidia-ml.so.1: the NVML C API (the subset nvidia-ml-py needs for discovery)
# answered by NVIDIA's go-nvml mock servers (pkg/nvml/mock/dgx{a100,h100,h200,b200}), so the real
# nvidia-ml-py can be loaded through LD_LIBRARY_PATH with no GPU.
#
# Why our own bridge: NVIDIA's k8s-test-infra mocknvml is not served by the Go module proxy that
# this project may reach; go-nvml is, and its mock servers carry NVIDIA's device models.
# What it does not do: MIG through the C API (nvmlDeviceGetMigMode answers "disabled"), events,
# processes, clocks - anything else returns NVML_ERROR_NOT_SUPPORTED or is absent (pynvml then
# raises NVMLError_FunctionNotFound).
#
# Usage: build-mocknvml.sh OUT_DIR   (env GO_NVML_MODULE, GO_NVML_VERSION from pins.env)
# Output: OUT_DIR/lib/libnvidia-ml.so.1 (+ libnvidia-ml.so link), OUT_DIR/profiles/<name>.yaml
# Config: MOCK_NVML_CONFIG=<profile yaml>: "profile: dgxh100"; optional "gpu_count: N" (first N GPUs)
#         and "uuid_seed: NODE" (UUIDs are stable per seed+index; default seed: the profile).
set -euo pipefail

out=${1:?usage: build-mocknvml.sh OUT_DIR}
: "${GO_NVML_MODULE:?set GO_NVML_MODULE (see pins.env)}" "${GO_NVML_VERSION:?set GO_NVML_VERSION (see pins.env)}"
export GOFLAGS="${GOFLAGS:-} -buildvcs=false -mod=mod"
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
export CGO_ENABLED=1

rm -rf "$out/src" "$out/lib" "$out/profiles"
mkdir -p "$out/src" "$out/lib" "$out/profiles"
printf 'module gpudra.local/peers/mocknvml\n\ngo 1.26\n\nrequire %s %s\n' "$GO_NVML_MODULE" "$GO_NVML_VERSION" >"$out/src/go.mod"

cat >"$out/src/main.go" <<'GO'
// Package main is a c-shared libnvidia-ml.so.1 over go-nvml's mock servers.
package main

/*
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef struct nvmlDevice_st* nvmlDevice_t;
typedef struct { unsigned long long total; unsigned long long free; unsigned long long used; } nvmlMemory_t;
typedef struct {
	unsigned int version;
	unsigned long long total;
	unsigned long long reserved;
	unsigned long long free;
	unsigned long long used;
} nvmlMemory_v2_t;
typedef struct {
	char busIdLegacy[16];
	unsigned int domain;
	unsigned int bus;
	unsigned int device;
	unsigned int pciDeviceId;
	unsigned int pciSubSystemId;
	char busId[32];
} nvmlPciInfo_t;
*/
import "C"

import (
	"bufio"
	"crypto/sha1"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxb200"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh200"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
)

// NVML return codes (nvml.h).
const (
	rSuccess          = 0
	rUninitialized    = 1
	rInvalidArgument  = 2
	rNotSupported     = 3
	rNotFound         = 6
	rInsufficientSize = 7
	rDriverNotLoaded  = 9
)

var (
	mu       sync.Mutex
	refs     int
	srv      nvml.Interface
	devices  []nvml.Device
	handles  []C.nvmlDevice_t // C-allocated cookies: stable, outside the Go heap
	errTexts = map[int]*C.char{}
)

func newServer(profile string) (nvml.Interface, error) {
	switch profile {
	case "dgxa100":
		return dgxa100.New(), nil
	case "dgxh100":
		return dgxh100.New(), nil
	case "dgxh200":
		return dgxh200.New(), nil
	case "dgxb200":
		return dgxb200.New(), nil
	}
	return nil, fmt.Errorf("unknown profile %q (want dgxa100, dgxh100, dgxh200 or dgxb200)", profile)
}

type config struct {
	profile  string
	count    int
	uuidSeed string
}

// stableUUID replaces the mock's random per-process UUIDs: a real GPU keeps its UUID across
// processes, and tests of one simulated node read the library from several processes.
func stableUUID(seed string, index int) string {
	h := sha1.Sum([]byte(fmt.Sprintf("gpu-dra-mock-nvml/%s/%d", seed, index)))
	return fmt.Sprintf("GPU-%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
}

func readConfig(path string) (cfg config, err error) {
	f, err := os.Open(path)
	if err != nil {
		return cfg, err
	}
	defer f.Close()
	cfg.count = -1
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			return cfg, fmt.Errorf("line %q is not 'key: value'", line)
		}
		v = strings.Trim(strings.TrimSpace(v), `"'`)
		switch strings.TrimSpace(k) {
		case "profile":
			cfg.profile = v
		case "uuid_seed":
			cfg.uuidSeed = v
		case "gpu_count":
			if cfg.count, err = strconv.Atoi(v); err != nil {
				return cfg, fmt.Errorf("gpu_count %q is not a number", v)
			}
		default:
			return cfg, fmt.Errorf("unknown key %q (want profile, gpu_count, uuid_seed)", k)
		}
	}
	if cfg.uuidSeed == "" {
		cfg.uuidSeed = cfg.profile
	}
	return cfg, sc.Err()
}

func fail(format string, args ...any) C.nvmlReturn_t {
	fmt.Fprintf(os.Stderr, "mock libnvidia-ml: "+format+"\n", args...)
	return rDriverNotLoaded
}

func initLocked() C.nvmlReturn_t {
	if refs > 0 {
		refs++
		return rSuccess
	}
	path := os.Getenv("MOCK_NVML_CONFIG")
	if path == "" {
		return fail("MOCK_NVML_CONFIG is not set; point it at a profile file (profile: dgxh100)")
	}
	cfg, err := readConfig(path)
	if err != nil {
		return fail("reading MOCK_NVML_CONFIG=%s: %v", path, err)
	}
	s, err := newServer(cfg.profile)
	if err != nil {
		return fail("MOCK_NVML_CONFIG=%s: %v", path, err)
	}
	n, ret := s.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return C.nvmlReturn_t(ret)
	}
	if cfg.count >= 0 && cfg.count < n {
		n = cfg.count
	}
	devices = devices[:0]
	for i := 0; i < n; i++ {
		d, ret := s.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			return C.nvmlReturn_t(ret)
		}
		if sd, ok := d.(*server.Device); ok {
			sd.UUID = stableUUID(cfg.uuidSeed, i)
		}
		devices = append(devices, d)
		if len(handles) <= i {
			handles = append(handles, C.nvmlDevice_t(C.malloc(1)))
		}
	}
	srv = s
	refs = 1
	return rSuccess
}

// guard runs f with the library initialised, turning a mock method that was never set into
// NOT_SUPPORTED instead of a crash of the host process.
func guard(f func() C.nvmlReturn_t) (r C.nvmlReturn_t) {
	mu.Lock()
	defer mu.Unlock()
	if refs == 0 {
		return rUninitialized
	}
	defer func() {
		if recover() != nil {
			r = rNotSupported
		}
	}()
	return f()
}

func device(h C.nvmlDevice_t) nvml.Device {
	for i, c := range handles[:len(devices)] {
		if c == h {
			return devices[i]
		}
	}
	return nil
}

func deviceCall(h C.nvmlDevice_t, f func(nvml.Device) C.nvmlReturn_t) C.nvmlReturn_t {
	return guard(func() C.nvmlReturn_t {
		d := device(h)
		if d == nil {
			return rInvalidArgument
		}
		return f(d)
	})
}

func putString(dst *C.char, length C.uint, s string) C.nvmlReturn_t {
	if dst == nil {
		return rInvalidArgument
	}
	if int(length) < len(s)+1 {
		return rInsufficientSize
	}
	buf := unsafe.Slice((*byte)(unsafe.Pointer(dst)), int(length))
	copy(buf, s)
	buf[len(s)] = 0
	return rSuccess
}

func copyChars(dst []C.char, src []int8) {
	for i := range dst {
		if i < len(src) {
			dst[i] = C.char(src[i])
		} else {
			dst[i] = 0
		}
	}
}

func toChars(dst []int8, s string) {
	for i := range dst {
		dst[i] = 0
		if i < len(s) && i < len(dst)-1 {
			dst[i] = int8(s[i])
		}
	}
}

//export nvmlInitWithFlags
func nvmlInitWithFlags(flags C.uint) C.nvmlReturn_t {
	mu.Lock()
	defer mu.Unlock()
	return initLocked()
}

//export nvmlInit_v2
func nvmlInit_v2() C.nvmlReturn_t { return nvmlInitWithFlags(0) }

//export nvmlInit
func nvmlInit() C.nvmlReturn_t { return nvmlInitWithFlags(0) }

//export nvmlShutdown
func nvmlShutdown() C.nvmlReturn_t {
	mu.Lock()
	defer mu.Unlock()
	if refs == 0 {
		return rUninitialized
	}
	refs--
	return rSuccess
}

//export nvmlErrorString
func nvmlErrorString(r C.nvmlReturn_t) *C.char {
	mu.Lock()
	defer mu.Unlock()
	if p, ok := errTexts[int(r)]; ok {
		return p
	}
	text := nvml.Return(r).Error()
	p := C.CString(text)
	errTexts[int(r)] = p
	return p
}

//export nvmlSystemGetDriverVersion
func nvmlSystemGetDriverVersion(version *C.char, length C.uint) C.nvmlReturn_t {
	return guard(func() C.nvmlReturn_t {
		v, ret := srv.SystemGetDriverVersion()
		if ret != nvml.SUCCESS {
			return C.nvmlReturn_t(ret)
		}
		return putString(version, length, v)
	})
}

//export nvmlSystemGetNVMLVersion
func nvmlSystemGetNVMLVersion(version *C.char, length C.uint) C.nvmlReturn_t {
	return guard(func() C.nvmlReturn_t {
		v, ret := srv.SystemGetNVMLVersion()
		if ret != nvml.SUCCESS {
			return C.nvmlReturn_t(ret)
		}
		return putString(version, length, v)
	})
}

//export nvmlSystemGetCudaDriverVersion
func nvmlSystemGetCudaDriverVersion(v *C.int) C.nvmlReturn_t {
	return guard(func() C.nvmlReturn_t {
		n, ret := srv.SystemGetCudaDriverVersion()
		if ret == nvml.SUCCESS && v != nil {
			*v = C.int(n)
		}
		return C.nvmlReturn_t(ret)
	})
}

//export nvmlSystemGetCudaDriverVersion_v2
func nvmlSystemGetCudaDriverVersion_v2(v *C.int) C.nvmlReturn_t { return nvmlSystemGetCudaDriverVersion(v) }

//export nvmlDeviceGetCount_v2
func nvmlDeviceGetCount_v2(count *C.uint) C.nvmlReturn_t {
	return guard(func() C.nvmlReturn_t {
		if count == nil {
			return rInvalidArgument
		}
		*count = C.uint(len(devices))
		return rSuccess
	})
}

//export nvmlDeviceGetCount
func nvmlDeviceGetCount(count *C.uint) C.nvmlReturn_t { return nvmlDeviceGetCount_v2(count) }

//export nvmlDeviceGetHandleByIndex_v2
func nvmlDeviceGetHandleByIndex_v2(index C.uint, out *C.nvmlDevice_t) C.nvmlReturn_t {
	return guard(func() C.nvmlReturn_t {
		if out == nil || int(index) >= len(devices) {
			return rInvalidArgument
		}
		*out = handles[index]
		return rSuccess
	})
}

//export nvmlDeviceGetHandleByIndex
func nvmlDeviceGetHandleByIndex(index C.uint, out *C.nvmlDevice_t) C.nvmlReturn_t {
	return nvmlDeviceGetHandleByIndex_v2(index, out)
}

func findHandle(out *C.nvmlDevice_t, match func(nvml.Device) bool) C.nvmlReturn_t {
	return guard(func() C.nvmlReturn_t {
		if out == nil {
			return rInvalidArgument
		}
		for i, d := range devices {
			if match(d) {
				*out = handles[i]
				return rSuccess
			}
		}
		return rNotFound
	})
}

//export nvmlDeviceGetHandleByUUID
func nvmlDeviceGetHandleByUUID(uuid *C.char, out *C.nvmlDevice_t) C.nvmlReturn_t {
	want := C.GoString(uuid)
	return findHandle(out, func(d nvml.Device) bool { u, r := d.GetUUID(); return r == nvml.SUCCESS && u == want })
}

//export nvmlDeviceGetHandleByPciBusId_v2
func nvmlDeviceGetHandleByPciBusId_v2(busID *C.char, out *C.nvmlDevice_t) C.nvmlReturn_t {
	want := strings.ToLower(C.GoString(busID))
	return findHandle(out, func(d nvml.Device) bool {
		sd, ok := d.(*server.Device)
		if !ok {
			return false
		}
		var dom, bus, dev, fn uint32
		if _, err := fmt.Sscanf(sd.PciBusID, "%x:%x:%x.%x", &dom, &bus, &dev, &fn); err != nil {
			return false
		}
		return want == strings.ToLower(fmt.Sprintf("%08X:%02X:%02X.%X", dom, bus, dev, fn)) ||
			want == strings.ToLower(fmt.Sprintf("%04X:%02X:%02X.%X", dom, bus, dev, fn))
	})
}

//export nvmlDeviceGetName
func nvmlDeviceGetName(h C.nvmlDevice_t, name *C.char, length C.uint) C.nvmlReturn_t {
	return deviceCall(h, func(d nvml.Device) C.nvmlReturn_t {
		v, ret := d.GetName()
		if ret != nvml.SUCCESS {
			return C.nvmlReturn_t(ret)
		}
		return putString(name, length, v)
	})
}

//export nvmlDeviceGetUUID
func nvmlDeviceGetUUID(h C.nvmlDevice_t, uuid *C.char, length C.uint) C.nvmlReturn_t {
	return deviceCall(h, func(d nvml.Device) C.nvmlReturn_t {
		v, ret := d.GetUUID()
		if ret != nvml.SUCCESS {
			return C.nvmlReturn_t(ret)
		}
		return putString(uuid, length, v)
	})
}

//export nvmlDeviceGetSerial
func nvmlDeviceGetSerial(h C.nvmlDevice_t, serial *C.char, length C.uint) C.nvmlReturn_t {
	return deviceCall(h, func(d nvml.Device) C.nvmlReturn_t {
		v, ret := d.GetSerial()
		if ret != nvml.SUCCESS {
			return C.nvmlReturn_t(ret)
		}
		return putString(serial, length, v)
	})
}

//export nvmlDeviceGetMemoryInfo
func nvmlDeviceGetMemoryInfo(h C.nvmlDevice_t, m *C.nvmlMemory_t) C.nvmlReturn_t {
	return deviceCall(h, func(d nvml.Device) C.nvmlReturn_t {
		v, ret := d.GetMemoryInfo()
		if ret != nvml.SUCCESS || m == nil {
			return C.nvmlReturn_t(ret)
		}
		m.total, m.free, m.used = C.ulonglong(v.Total), C.ulonglong(v.Free), C.ulonglong(v.Used)
		return rSuccess
	})
}

//export nvmlDeviceGetMemoryInfo_v2
func nvmlDeviceGetMemoryInfo_v2(h C.nvmlDevice_t, m *C.nvmlMemory_v2_t) C.nvmlReturn_t {
	return deviceCall(h, func(d nvml.Device) C.nvmlReturn_t {
		v, ret := d.GetMemoryInfo()
		if ret != nvml.SUCCESS || m == nil {
			return C.nvmlReturn_t(ret)
		}
		m.total, m.reserved, m.free, m.used = C.ulonglong(v.Total), 0, C.ulonglong(v.Free), C.ulonglong(v.Used)
		return rSuccess
	})
}

//export nvmlDeviceGetCudaComputeCapability
func nvmlDeviceGetCudaComputeCapability(h C.nvmlDevice_t, major, minor *C.int) C.nvmlReturn_t {
	return deviceCall(h, func(d nvml.Device) C.nvmlReturn_t {
		a, b, ret := d.GetCudaComputeCapability()
		if ret == nvml.SUCCESS && major != nil && minor != nil {
			*major, *minor = C.int(a), C.int(b)
		}
		return C.nvmlReturn_t(ret)
	})
}

//export nvmlDeviceGetPciInfo_v3
func nvmlDeviceGetPciInfo_v3(h C.nvmlDevice_t, p *C.nvmlPciInfo_t) C.nvmlReturn_t {
	return deviceCall(h, func(d nvml.Device) C.nvmlReturn_t {
		v, ret := d.GetPciInfo()
		if ret != nvml.SUCCESS || p == nil {
			return C.nvmlReturn_t(ret)
		}
		if sd, ok := d.(*server.Device); ok && v.BusId[0] == 0 {
			// The mock keeps the bus id beside PciInfo; NVML reports it inside, 8-digit domain.
			var dom, bus, dev, fn uint32
			if _, err := fmt.Sscanf(sd.PciBusID, "%x:%x:%x.%x", &dom, &bus, &dev, &fn); err == nil {
				v.Domain, v.Bus, v.Device = dom, bus, dev
				toChars(v.BusId[:], fmt.Sprintf("%08X:%02X:%02X.%X", dom, bus, dev, fn))
				toChars(v.BusIdLegacy[:], fmt.Sprintf("%04X:%02X:%02X.%X", dom, bus, dev, fn))
			}
		}
		copyChars(p.busIdLegacy[:], v.BusIdLegacy[:])
		copyChars(p.busId[:], v.BusId[:])
		p.domain, p.bus, p.device = C.uint(v.Domain), C.uint(v.Bus), C.uint(v.Device)
		p.pciDeviceId, p.pciSubSystemId = C.uint(v.PciDeviceId), C.uint(v.PciSubSystemId)
		return rSuccess
	})
}

//export nvmlDeviceGetPciInfo
func nvmlDeviceGetPciInfo(h C.nvmlDevice_t, p *C.nvmlPciInfo_t) C.nvmlReturn_t {
	return nvmlDeviceGetPciInfo_v3(h, p)
}

func uintCall(h C.nvmlDevice_t, out *C.uint, get func(nvml.Device) (uint32, nvml.Return)) C.nvmlReturn_t {
	return deviceCall(h, func(d nvml.Device) C.nvmlReturn_t {
		v, ret := get(d)
		if ret == nvml.SUCCESS && out != nil {
			*out = C.uint(v)
		}
		return C.nvmlReturn_t(ret)
	})
}

//export nvmlDeviceGetArchitecture
func nvmlDeviceGetArchitecture(h C.nvmlDevice_t, out *C.uint) C.nvmlReturn_t {
	return uintCall(h, out, func(d nvml.Device) (uint32, nvml.Return) { v, r := d.GetArchitecture(); return uint32(v), r })
}

//export nvmlDeviceGetBrand
func nvmlDeviceGetBrand(h C.nvmlDevice_t, out *C.uint) C.nvmlReturn_t {
	return uintCall(h, out, func(d nvml.Device) (uint32, nvml.Return) { v, r := d.GetBrand(); return uint32(v), r })
}

//export nvmlDeviceGetIndex
func nvmlDeviceGetIndex(h C.nvmlDevice_t, out *C.uint) C.nvmlReturn_t {
	return uintCall(h, out, func(d nvml.Device) (uint32, nvml.Return) { v, r := d.GetIndex(); return uint32(v), r })
}

//export nvmlDeviceGetMinorNumber
func nvmlDeviceGetMinorNumber(h C.nvmlDevice_t, out *C.uint) C.nvmlReturn_t {
	return uintCall(h, out, func(d nvml.Device) (uint32, nvml.Return) { v, r := d.GetMinorNumber(); return uint32(v), r })
}

//export nvmlDeviceGetMigMode
func nvmlDeviceGetMigMode(h C.nvmlDevice_t, current, pending *C.uint) C.nvmlReturn_t {
	return deviceCall(h, func(d nvml.Device) C.nvmlReturn_t {
		a, b, ret := d.GetMigMode()
		if ret == nvml.SUCCESS && current != nil && pending != nil {
			*current, *pending = C.uint(a), C.uint(b)
		}
		return C.nvmlReturn_t(ret)
	})
}


func main() {}
GO

for p in dgxa100 dgxh100 dgxh200 dgxb200; do
  printf '# MOCK_NVML_CONFIG for the gpu-dra mock libnvidia-ml (go-nvml %s mock server)\nprofile: %s\n' \
    "$GO_NVML_VERSION" "$p" >"$out/profiles/$p.yaml"
done

cd "$out/src"
go get "$GO_NVML_MODULE@$GO_NVML_VERSION" >"$out/get.log" 2>&1 || { cat "$out/get.log" >&2; exit 1; }
go mod tidy >>"$out/get.log" 2>&1 || { cat "$out/get.log" >&2; exit 1; }
lib="$out/lib/libnvidia-ml.so.1"
build() {
  CGO_LDFLAGS="-Wl,-soname,libnvidia-ml.so.1" \
    go build -buildmode=c-shared -ldflags='-s -w' -o "$lib" . >"$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log" >&2; exit 1; }
}
# go-nvml's own cgo layer references every NVML entry point; a real process would take them from
# the real library. Pass one finds those left undefined, pass two defines each as a stub answering
# NVML_ERROR_NOT_SUPPORTED (3), so that dlopen(RTLD_NOW) - what ctypes does - succeeds.
build
{
  echo "/* Generated by build-mocknvml.sh: NVML entry points this mock does not implement. */"
  nm -D --undefined-only "$lib" | awk '$2 ~ /^nvml/ {print "int " $2 "(void) { return 3; }"}'
} >stubs.c
build
left=$(nm -D --undefined-only "$lib" | awk '$2 ~ /^nvml/' | wc -l)
[[ $left -eq 0 ]] || { echo "mock libnvidia-ml still has $left undefined NVML symbols" >&2; exit 1; }
rm -f "$out/lib/libnvidia-ml.so.1.h"
ln -sf libnvidia-ml.so.1 "$out/lib/libnvidia-ml.so"
