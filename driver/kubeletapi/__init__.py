"""Generated kubelet wire stubs (make proto). Do not edit; see proto/README.md."""
