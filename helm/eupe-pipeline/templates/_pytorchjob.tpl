{{/* One replica type (Master or Worker) of the PyTorchJob template. */}}
{{- define "eupe.pytorchReplica" -}}
{{- $ := .root -}}
{{- $t := $.Values.training -}}
replicas: {{ .replicas }}
restartPolicy: ExitCode  # 128+ (a killed or evicted pod): the operator restarts it, and it resumes; 1-127 (a crash, bad input, a failed gate): the job fails and Airflow decides by the exit code
template:
  metadata:
    labels:
      {{- include "eupe.selectorLabels" $ | nindent 6 }}
      app.kubernetes.io/component: training
  spec:
    serviceAccountName: {{ include "eupe.serviceAccountName" $ }}
    automountServiceAccountToken: false
    securityContext:
      {{- include "eupe.podSecurityContext" $ | nindent 6 }}
    {{- include "eupe.imagePullSecrets" $ | trim | nindent 4 }}
    {{- with $t.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $t.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: pytorch
        image: {{ default (include "eupe.image" $) (include "eupe.gpuImage" $) | quote }}
        imagePullPolicy: {{ $.Values.image.pullPolicy }}
        command: [torchrun]
        args: [-m, components.task]
        ports:
          - name: pytorchjob-port
            containerPort: {{ $t.masterPort }}
          - name: metrics
            containerPort: {{ $t.metricsPort }}
        envFrom:
          {{- include "eupe.secretEnvFrom" $ | nindent 10 }}
        env:
          {{- include "eupe.scratchEnv" $ | nindent 10 }}
          - name: EUPE_METRICS_PORT
            value: {{ $t.metricsPort | quote }}
          - name: EUPE_PUSHGATEWAY
            value: {{ include "eupe.pushgateway" $ | quote }}
        resources:
          requests:
            {{- toYaml $t.resources.requests | nindent 12 }}
            {{- if gt (int $t.gpusPerNode) 0 }}
            nvidia.com/gpu: {{ $t.gpusPerNode | quote }}
            {{- end }}
          limits:
            {{- toYaml $t.resources.limits | nindent 12 }}
            {{- if gt (int $t.gpusPerNode) 0 }}
            nvidia.com/gpu: {{ $t.gpusPerNode | quote }}
            {{- end }}
        securityContext:
          {{- include "eupe.containerSecurityContext" $ | nindent 10 }}
        volumeMounts:
          {{- include "eupe.scratchMounts" $ | nindent 10 }}
          - name: dshm
            mountPath: /dev/shm
          {{- if $t.checkpoints.existingClaim }}
          - name: checkpoints
            mountPath: {{ $t.checkpoints.mountPath }}
          {{- end }}
    volumes:
      {{- include "eupe.scratchVolumes" $ | nindent 6 }}
      - name: dshm
        emptyDir:
          medium: Memory
          sizeLimit: {{ $t.shmSizeLimit }}
      {{- if $t.checkpoints.existingClaim }}
      - name: checkpoints
        persistentVolumeClaim:
          claimName: {{ $t.checkpoints.existingClaim }}
      {{- end }}
{{- end -}}

{{/* The PyTorchJob template the training steps' Airflow operator loads (it sets metadata.name, appends the
     step's arguments to the container args and sets the Worker replicas). */}}
{{- define "eupe.pytorchjob" -}}
{{- $t := .Values.training -}}
{{- if and (not (hasPrefix "s3://" .Values.settings.artifactRoot)) (not $t.checkpoints.existingClaim) -}}
{{- fail "training.checkpoints.existingClaim: an existing PVC is required when settings.artifactRoot is not an s3:// prefix" -}}
{{- end -}}
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata:
  name: {{ include "eupe.fullname" . }}-train
  namespace: {{ include "eupe.namespace" . }}
  labels:
    {{- include "eupe.labels" . | nindent 4 }}
    app.kubernetes.io/component: training
spec:
  nprocPerNode: {{ $t.nprocPerNode | toString | quote }}
  # torchrun with a c10d rendezvous on the Master's port: a worker that dies restarts the whole worker group
  # (up to maxRestarts times), which resumes from the last checkpoint (the step runs with --resume auto).
  # The Airflow operator sets rdzvHost (<job>-master-0) and min/maxReplicas (the step's nodes) per job.
  elasticPolicy:
    rdzvBackend: c10d
    rdzvPort: {{ $t.masterPort }}
    minReplicas: {{ $t.nodes }}
    maxReplicas: {{ $t.nodes }}
    maxRestarts: {{ $t.maxRestarts }}
  runPolicy:
    cleanPodPolicy: {{ $t.cleanPodPolicy }}
    backoffLimit: {{ $t.backoffLimit }}
  pytorchReplicaSpecs:
    Master:
      {{- include "eupe.pytorchReplica" (dict "root" . "replicas" 1) | nindent 6 }}
    Worker:
      {{- include "eupe.pytorchReplica" (dict "root" . "replicas" (sub (int $t.nodes) 1)) | nindent 6 }}
{{- end -}}
