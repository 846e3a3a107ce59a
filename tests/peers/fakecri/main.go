// Command fakecri serves Kubernetes' fake container runtime (k8s.io/cri-client/pkg/fake) on a Unix
// socket, for a real kubelet on a test node with no container runtime.
//
// Why: the kubelet is the part of a node that calls a DRA plugin; it needs a CRI runtime to get
// that far, and a real one (containerd + runc) needs images and root filesystems. The fake keeps
// sandboxes and containers as records. What this command adds to it:
//
//   - one JSON line per CRI request in --log, so tests read back what the kubelet asked the
//     runtime for (for CreateContainer: pod, container, CDI devices, env, mounts, devices);
//   - the status, runtime configuration, image-filesystem usage and image size that the kubelet
//     needs before it runs a pod (without an image size every pod fails with
//     CreateContainerConfigError "Id or size of image ... is not set");
//   - --control-dir: a test writes "exit-<pod UID>-<container name>" holding an exit code, and that
//     running container exits with it (a finished Job's container, for instance).
//
// What it does not do: run processes, pull images, or set up networking.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	kubeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/cri-client/pkg/fake"
)

type journal struct {
	mu  sync.Mutex
	enc *json.Encoder
	f   *os.File
}

func (j *journal) write(entry map[string]any) {
	j.mu.Lock()
	defer j.mu.Unlock()
	_ = j.enc.Encode(entry)
}

// text accepts both spellings of a CRI value across releases (string, or bytes in newer cri-api).
func text(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case []byte:
		return string(x)
	}
	return fmt.Sprint(v)
}

func podOf(cfg *kubeapi.PodSandboxConfig) map[string]string {
	md := cfg.GetMetadata()
	return map[string]string{"namespace": md.GetNamespace(), "name": md.GetName(), "uid": md.GetUid()}
}

// describe picks what a test asserts on from a request; every request gets at least its method.
func describe(req any, entry map[string]any) {
	switch r := req.(type) {
	case *kubeapi.RunPodSandboxRequest:
		entry["pod"] = podOf(r.GetConfig())
	case *kubeapi.CreateContainerRequest:
		cfg := r.GetConfig()
		entry["pod"] = podOf(r.GetSandboxConfig())
		entry["sandbox"] = r.GetPodSandboxId()
		entry["container"] = cfg.GetMetadata().GetName()
		entry["image"] = cfg.GetImage().GetImage()
		cdi := []string{}
		for _, d := range cfg.GetCDIDevices() {
			cdi = append(cdi, d.GetName())
		}
		entry["cdi_devices"] = cdi
		env := map[string]string{}
		for _, kv := range cfg.GetEnvs() {
			env[kv.GetKey()] = text(kv.GetValue())
		}
		entry["env"] = env
		mounts := []map[string]any{}
		for _, m := range cfg.GetMounts() {
			mounts = append(mounts, map[string]any{
				"container_path": m.GetContainerPath(), "host_path": m.GetHostPath(), "readonly": m.GetReadonly(),
			})
		}
		entry["mounts"] = mounts
		devices := []map[string]string{}
		for _, d := range cfg.GetDevices() {
			devices = append(devices, map[string]string{
				"container_path": d.GetContainerPath(), "host_path": d.GetHostPath(), "permissions": d.GetPermissions(),
			})
		}
		entry["devices"] = devices
	case *kubeapi.StartContainerRequest:
		entry["container_id"] = r.GetContainerId()
	case *kubeapi.StopContainerRequest:
		entry["container_id"] = r.GetContainerId()
	case *kubeapi.RemoveContainerRequest:
		entry["container_id"] = r.GetContainerId()
	case *kubeapi.PodSandboxStatusRequest:
		entry["sandbox"] = r.GetPodSandboxId()
	case *kubeapi.ContainerStatusRequest:
		entry["container_id"] = r.GetContainerId()
	case *kubeapi.StopPodSandboxRequest:
		entry["sandbox"] = r.GetPodSandboxId()
	case *kubeapi.RemovePodSandboxRequest:
		entry["sandbox"] = r.GetPodSandboxId()
	}
}

func (j *journal) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := handler(ctx, req)
	method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
	entry := map[string]any{"time": time.Now().UTC().Format(time.RFC3339Nano), "method": method}
	describe(req, entry)
	if r, ok := resp.(*kubeapi.CreateContainerResponse); ok && err == nil {
		entry["container_id"] = r.GetContainerId()
	}
	if r, ok := resp.(*kubeapi.RunPodSandboxResponse); ok && err == nil {
		entry["sandbox"] = r.GetPodSandboxId()
	}
	if err != nil {
		entry["error"] = status.Convert(err).Message()
	}
	j.write(entry)
	return resp, err
}

func (j *journal) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
	j.write(map[string]any{"time": time.Now().UTC().Format(time.RFC3339Nano), "method": method, "stream": true})
	return handler(srv, ss)
}

// applyExits makes running containers exit as the control files ask; it also drops the fake's
// record of every call, which otherwise grows by a few entries a second for as long as it runs.
func applyExits(rt *fake.RemoteRuntime, dir string, j *journal) {
	names, _ := filepath.Glob(filepath.Join(dir, "exit-*"))
	svc := rt.RuntimeService
	svc.Lock()
	defer svc.Unlock()
	svc.Called = svc.Called[:0]
	for _, path := range names {
		raw, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		code, err := strconv.Atoi(strings.TrimSpace(string(raw)))
		if err != nil {
			fmt.Fprintf(os.Stderr, "fakecri: %s: want an exit code, got %q\n", path, raw)
			_ = os.Remove(path)
			continue
		}
		want := strings.TrimPrefix(filepath.Base(path), "exit-")
		for _, c := range svc.Containers {
			sb, ok := svc.Sandboxes[c.SandboxID]
			if !ok || c.State != kubeapi.ContainerState_CONTAINER_RUNNING {
				continue
			}
			if sb.GetMetadata().GetUid()+"-"+c.GetMetadata().GetName() != want {
				continue
			}
			c.State = kubeapi.ContainerState_CONTAINER_EXITED
			c.ExitCode = int32(code)
			c.FinishedAt = time.Now().UnixNano()
			if code == 0 {
				c.Reason = "Completed"
			} else {
				c.Reason = "Error"
			}
			j.write(map[string]any{
				"time": time.Now().UTC().Format(time.RFC3339Nano), "method": "(exit)", "container_id": c.Id,
				"exit_code": code,
			})
		}
		_ = os.Remove(path)
	}
}

func main() {
	listen := flag.String("listen", "", "Unix socket to serve CRI on")
	logPath := flag.String("log", "", "file to append one JSON line per CRI request to")
	controlDir := flag.String("control-dir", "", "directory polled for exit-<pod UID>-<container> files")
	fsPath := flag.String("image-fs", "/", "mount point reported as the image filesystem")
	flag.Parse()
	if *listen == "" || *logPath == "" {
		fmt.Fprintln(os.Stderr, "fakecri: --listen and --log are required")
		os.Exit(2)
	}
	f, err := os.OpenFile(*logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		fmt.Fprintf(os.Stderr, "fakecri: opening --log: %v\n", err)
		os.Exit(1)
	}
	j := &journal{enc: json.NewEncoder(f), f: f}

	rt := fake.NewFakeRemoteRuntime()
	rt.RuntimeService.FakeStatus = &kubeapi.RuntimeStatus{Conditions: []*kubeapi.RuntimeCondition{
		{Type: kubeapi.RuntimeReady, Status: true},
		{Type: kubeapi.NetworkReady, Status: true},
	}}
	rt.RuntimeService.FakeLinuxConfiguration = &kubeapi.LinuxRuntimeConfiguration{CgroupDriver: kubeapi.CgroupDriver_CGROUPFS}
	rt.ImageService.SetFakeImageSize(64 << 20)
	rt.ImageService.SetFakeFilesystemUsage([]*kubeapi.FilesystemUsage{{
		Timestamp:  time.Now().UnixNano(),
		FsId:       &kubeapi.FilesystemIdentifier{Mountpoint: *fsPath},
		UsedBytes:  &kubeapi.UInt64Value{Value: 1 << 30},
		InodesUsed: &kubeapi.UInt64Value{Value: 1000},
	}})

	// Our own server (the fake's Start serves without interceptors); the fake implements both services.
	srv := grpc.NewServer(grpc.UnaryInterceptor(j.unary), grpc.StreamInterceptor(j.stream))
	kubeapi.RegisterRuntimeServiceServer(srv, rt)
	kubeapi.RegisterImageServiceServer(srv, rt)
	_ = os.Remove(*listen)
	l, err := net.Listen("unix", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "fakecri: listening on %s: %v\n", *listen, err)
		os.Exit(1)
	}
	go func() { _ = srv.Serve(l) }()
	fmt.Fprintf(os.Stderr, "fakecri: serving CRI on %s, journal %s\n", *listen, *logPath)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-sig:
			srv.Stop()
			_ = os.Remove(*listen)
			_ = f.Close()
			return
		case <-tick.C:
			if *controlDir != "" {
				applyExits(rt, *controlDir, j)
			}
		}
	}
}
