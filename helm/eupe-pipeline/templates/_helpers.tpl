{{/* The chart's name: the label value the step pods of components/airflow_pod.py carry too. */}}
{{- define "eupe.name" -}}
{{- default "eupe" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eupe.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "eupe.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "eupe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eupe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "eupe.labels" -}}
{{ include "eupe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
{{- end -}}

{{- define "eupe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "eupe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "eupe.namespace" -}}
{{- default .Release.Namespace .Values.settings.namespace -}}
{{- end -}}

{{- define "eupe.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/* The GPU steps' image, or "" (the same image). */}}
{{- define "eupe.gpuImage" -}}
{{- if .Values.gpuImage.repository -}}
{{- printf "%s:%s" .Values.gpuImage.repository (default .Values.image.tag .Values.gpuImage.tag) -}}
{{- end -}}
{{- end -}}

{{- define "eupe.pushgateway" -}}
{{- if .Values.pushgateway.enabled -}}
{{- printf "%s-pushgateway.%s.svc:%v" (include "eupe.fullname" .) .Release.Namespace .Values.pushgateway.port -}}
{{- else -}}
{{- .Values.pushgateway.url -}}
{{- end -}}
{{- end -}}

{{/* Whether to create the Prometheus operator's resources: the value, or (null) the cluster's API. */}}
{{- define "eupe.prometheusOperator" -}}
{{- $v := .Values.monitoring.prometheusOperator -}}
{{- if kindIs "bool" $v -}}
{{- ternary "true" "" $v -}}
{{- else if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}
true
{{- end -}}
{{- end -}}

{{/* The pod security context of every pod: non-root UID/GID as the image (containers/) and airflow_pod.py. */}}
{{- define "eupe.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "eupe.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Writable scratch on the read-only root filesystem: /tmp and EUPE_CACHE. */}}
{{- define "eupe.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.scratch.cacheSizeLimit }}
{{- end -}}

{{- define "eupe.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ .Values.scratch.cacheDir }}
{{- end -}}

{{- define "eupe.scratchEnv" -}}
- name: HOME
  value: /tmp
- name: EUPE_CACHE
  value: {{ .Values.scratch.cacheDir | quote }}
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{/* The object store's (and the DVC remote's) settings, from existing Secrets. */}}
{{- define "eupe.secretEnvFrom" -}}
- secretRef:
    name: {{ .Values.objectStore.existingSecret }}
{{- with .Values.dvc.existingSecret }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end -}}

{{- define "eupe.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
