{{/* Names used by every template. */}}
{{- define "gpu-dra.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gpu-dra.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "gpu-dra.labels" -}}
app.kubernetes.io/name: {{ include "gpu-dra.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "gpu-dra.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpu-dra.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: kubelet-plugin
{{- end -}}

{{- define "gpu-dra.serviceAccountName" -}}
{{- if .Values.serviceAccount.name -}}
{{- .Values.serviceAccount.name -}}
{{- else -}}
{{- printf "%s-kubelet-plugin" (include "gpu-dra.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gpu-dra.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "gpu-dra.stateDir" -}}
{{- $plugins := (.Values.kubeletPlugin | default dict).kubeletPluginsDirectoryPath | default .Values.kubeletDirs.plugins -}}
{{- default (printf "%s/gpu.nvidia.com" $plugins) .Values.stateDir -}}
{{- end -}}

{{/* Keys of a values file written for NVIDIA's chart that have no meaning here, one per line. */}}
{{- define "gpu-dra.ignoredNvidiaKeys" -}}
{{- $ignored := list -}}
{{- range $key := list "namespaceOverride" "selectorLabelsOverride" "allowDefaultNamespace" "resourceApiVersion" "gpuResourcesEnabledOverride" "webhook" "controller" "imex" "altProcDevices" "maskNvidiaDriverParams" "consumableShares" "resources" -}}
{{- if hasKey $.Values $key -}}{{- $ignored = append $ignored $key -}}{{- end -}}
{{- end -}}
{{- $kp := .Values.kubeletPlugin | default dict -}}
{{- $mapped := list "priorityClassName" "nodeSelector" "tolerations" "affinity" "podAnnotations" "kubeletRegistrarDirectoryPath" "kubeletPluginsDirectoryPath" "containers" -}}
{{- range $key, $_ := $kp -}}
{{- if not (has $key $mapped) -}}{{- $ignored = append $ignored (printf "kubeletPlugin.%s" $key) -}}{{- end -}}
{{- end -}}
{{- range $name, $container := ($kp.containers | default dict) -}}
{{- if ne $name "gpus" -}}
{{- $ignored = append $ignored (printf "kubeletPlugin.containers.%s" $name) -}}
{{- else -}}
{{- range $key, $_ := $container -}}
{{- if not (has $key (list "healthcheckPort" "resources")) -}}{{- $ignored = append $ignored (printf "kubeletPlugin.containers.gpus.%s" $key) -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- join "\n" $ignored -}}
{{- end -}}

{{/* plugin.featureGates as the plugin's FEATURE_GATES value: Name=true,Other=false, sorted. */}}
{{- define "gpu-dra.featureGates" -}}
{{- $gates := list -}}
{{- range $name, $on := . -}}
{{- $gates = append $gates (printf "%s=%t" $name $on) -}}
{{- end -}}
{{- join "," $gates -}}
{{- end -}}

{{/* The server's version as major.minor.0, from Major/Minor rather than the git version string:
     vendor builds report minors like "36+", and builds without version stamping report a
     git version of v0.0.0 while Major/Minor stay right. */}}
{{- define "gpu-dra.kubeVersion" -}}
{{- printf "%s.%s.0" (regexReplaceAll "[^0-9]" .Capabilities.KubeVersion.Major "") (regexReplaceAll "[^0-9]" .Capabilities.KubeVersion.Minor "") -}}
{{- end -}}
