{{- define "saeflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "saeflow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "saeflow.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Object name of a role's workload and Service; 50 + "-producer" stays within 63. */}}
{{- define "saeflow.roleName" -}}
{{- printf "%s-%s" (include "saeflow.fullname" .root) .role -}}
{{- end -}}

{{- define "saeflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "saeflow.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "saeflow.labels" -}}
{{ include "saeflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The gRPC service each role registers; readiness probes ask for it by name. */}}
{{- define "saeflow.grpcService" -}}
{{- get (dict "buffer" "saeflow.buffer.v1.BufferService" "producer" "saeflow.producer.v1.ProducerService" "trainer" "saeflow.trainer.v1.TrainerService") . -}}
{{- end -}}

{{/* Service name of the NATS chart's client port, following that chart's fullname rule. */}}
{{- define "saeflow.natsUrl" -}}
{{- $name := default "nats" .Values.nats.nameOverride -}}
{{- $host := "" -}}
{{- if .Values.nats.fullnameOverride -}}
{{- $host = .Values.nats.fullnameOverride -}}
{{- else if contains $name .Release.Name -}}
{{- $host = .Release.Name -}}
{{- else -}}
{{- $host = printf "%s-%s" .Release.Name $name -}}
{{- end -}}
{{- printf "nats://%s:4222" ($host | trunc 63 | trimSuffix "-") -}}
{{- end -}}

{{/*
The run's buffer shards as a JSON list of {index, service, address, hookPoints}: config.buffer.shards
with each shard's address set to its Service, or one shard holding every pool when that list is empty.
*/}}
{{- define "saeflow.shards" -}}
{{- $b := .Values.config.buffer -}}
{{- $given := default (list) $b.shards -}}
{{- if not $given -}}
{{- $names := list -}}
{{- range $b.hookPoints }}{{ $names = append $names .name }}{{ end -}}
{{- $given = list (dict "hookPoints" $names) -}}
{{- end -}}
{{- $out := list -}}
{{- range $i, $s := $given -}}
{{- $svc := printf "%s-%d" (include "saeflow.roleName" (dict "root" $ "role" "buffer")) $i -}}
{{- $out = append $out (dict "index" $i "service" $svc "address" (printf "%s:%d" $svc (int $.Values.buffer.port)) "hookPoints" $s.hookPoints) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Bytes of one shard's pools: capacityRows x sum of its hook points' widths x dtype bytes. Args: root, hookPoints. */}}
{{- define "saeflow.poolBytes" -}}
{{- $b := .root.Values.config.buffer -}}
{{- $width := 0 -}}
{{- range $b.hookPoints -}}
{{- if has .name $.hookPoints }}{{ $width = add $width .dModel }}{{ end -}}
{{- end -}}
{{- mul $b.capacityRows $width (get (dict "fp32" 4 "fp16" 2 "bf16" 2) $b.dtype) -}}
{{- end -}}

{{/*
Memory of a buffer pod: its shard's pools plus buffer.memoryOverheadMiB. The shards are one Indexed
Job, whose pods share one template, so every pod gets the largest shard's figure: a shard table
whose shards hold equal widths wastes nothing.
*/}}
{{- define "saeflow.bufferMemory" -}}
{{- $bytes := 0 -}}
{{- range include "saeflow.shards" . | fromJsonArray -}}
{{- $bytes = max $bytes (include "saeflow.poolBytes" (dict "root" $ "hookPoints" .hookPoints) | int64) -}}
{{- end -}}
{{- $mib := div (add $bytes 1048575) 1048576 -}}
{{- printf "%dMi" (add $mib .Values.buffer.memoryOverheadMiB | int64) -}}
{{- end -}}

{{/*
The run config every pod reads: config, with the facts of the whole release the chart owns written
in: the shard table with the Services' addresses, and how many producers and trainers there are.
*/}}
{{- define "saeflow.runConfig" -}}
{{- $c := deepCopy .Values.config -}}
{{- $shards := list -}}
{{- range include "saeflow.shards" . | fromJsonArray -}}
{{- $shards = append $shards (dict "address" .address "hookPoints" .hookPoints) -}}
{{- end -}}
{{- $_ := set $c.buffer "shards" $shards -}}
{{- /* The buffer shards end the run once every trainer process reading from them announced done. */ -}}
{{- $_ = set $c.buffer "trainers" (int .Values.trainer.replicas) -}}
{{- $producer := default (dict) $c.producer -}}
{{- $_ = set $producer "shardCount" (int .Values.producer.replicas) -}}
{{- $_ = set $c "producer" $producer -}}
{{- $trainer := default (dict) $c.trainer -}}
{{- $_ = set $trainer "shardCount" (int .Values.trainer.replicas) -}}
{{- $_ = set $c "trainer" $trainer -}}
{{- toYaml $c -}}
{{- end -}}

{{/* Refusals the schema cannot express: they span several keys. */}}
{{- define "saeflow.checks" -}}
{{- $c := .Values.config -}}
{{- if not .Values.nats.deploy -}}
{{- $url := dig "nats" "url" "" $c -}}
{{- if or (not $url) (contains "127.0.0.1" $url) (contains "localhost" $url) -}}
{{- fail (printf "config.nats.url: %q cannot be reached from the pods; set it to your NATS server or set nats.deploy=true" $url) -}}
{{- end -}}
{{- end -}}
{{- $pools := list -}}
{{- range $c.buffer.hookPoints }}{{ $pools = append $pools .name }}{{ end -}}
{{- $placed := list -}}
{{- range $i, $s := default (list) $c.buffer.shards -}}
{{- if hasKey $s "address" -}}
{{- fail (printf "config.buffer.shards.%d.address: the chart sets each shard's address to its Service (<release>-saeflow-buffer-%d); leave it out" $i $i) -}}
{{- end -}}
{{- range $j, $h := $s.hookPoints -}}
{{- if not (has $h $pools) -}}
{{- fail (printf "config.buffer.shards.%d.hookPoints.%d: %q has no pool in config.buffer.hookPoints" $i $j $h) -}}
{{- end -}}
{{- $placed = append $placed $h -}}
{{- end -}}
{{- end -}}
{{- if and (gt (len (default (list) $c.buffer.shards)) 1) (dig "buffer" "stateFile" "" $c) -}}
{{- fail "config.buffer.stateFile: every buffer shard would keep its ledger in this one file; leave it out (the chart gives each shard its own on the run claim when persistence.roles has buffer)" -}}
{{- end -}}
{{- if $c.buffer.shards -}}
{{- range $pools -}}
{{- if not (has . $placed) -}}
{{- fail (printf "config.buffer.shards: no shard holds the pool %s" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $model := dig "producer" "model" "" $c -}}
{{- if not (hasPrefix "/models/" $model) -}}
{{- fail (printf "config.producer.model: %q must be a path under /models, where modelVolume is mounted" $model) -}}
{{- end -}}
{{- $tokenizer := dig "producer" "tokenizer" "builtin:" $c -}}
{{- if not (or (hasPrefix "builtin:" $tokenizer) (hasPrefix "/models/" $tokenizer) (hasPrefix "/datasets/" $tokenizer)) -}}
{{- fail (printf "config.producer.tokenizer: %q must be builtin:... or a path under /models or /datasets" $tokenizer) -}}
{{- end -}}
{{- range $i, $d := dig "producer" "dataset" (list) $c -}}
{{- if not (or (hasPrefix "builtin:" $d) (and (hasPrefix "/datasets/" $d) $.Values.datasetVolume)) -}}
{{- fail (printf "config.producer.dataset.%d: %q must be builtin:... or a path under /datasets with datasetVolume set" $i $d) -}}
{{- end -}}
{{- end -}}
{{- if and (eq (dig "producer" "executionProvider" "cpu" $c) "cuda") (eq (int .Values.producer.gpu) 0) -}}
{{- fail "config.producer.executionProvider is cuda but producer.gpu is 0: give producers a GPU" -}}
{{- end -}}
{{- if and (ne (dig "trainer" "executionProvider" "cpu" $c) "cpu") (eq (int .Values.trainer.gpu) 0) -}}
{{- fail (printf "config.trainer.executionProvider is %s but trainer.gpu is 0: give trainers a GPU" (dig "trainer" "executionProvider" "cpu" $c)) -}}
{{- end -}}
{{- if include "saeflow.grpcTls" . -}}
{{- range $role := list "buffer" "producer" "trainer" -}}
{{- if not (index $.Values.tls.grpcSecrets $role) -}}
{{- fail (printf "tls.grpcSecrets.%s: config.transport.tls.mode is %s, so each role needs the Secret holding its certificate (tls.crt, tls.key, ca.crt)" $role (include "saeflow.grpcTls" $)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $auth := .Values.natsAuth -}}
{{- $keys := list -}}
{{- range $k := list "passwordKey" "tokenKey" "credsKey" "nkeyKey" -}}
{{- if index $auth $k -}}{{- $keys = append $keys $k -}}{{- end -}}
{{- end -}}
{{- if gt (len $keys) 1 -}}
{{- fail (printf "natsAuth: set one of passwordKey, tokenKey, credsKey, nkeyKey, not %s" (join " and " $keys)) -}}
{{- end -}}
{{- if and $auth.secret (eq (len $keys) 0) -}}
{{- fail "natsAuth.secret: name the key that holds the credential (passwordKey, tokenKey, credsKey or nkeyKey)" -}}
{{- end -}}
{{- if and (not $auth.secret) (gt (len $keys) 0) -}}
{{- fail (printf "natsAuth.%s: set natsAuth.secret, the Secret that holds it" (first $keys)) -}}
{{- end -}}
{{- if and $auth.passwordKey (not (dig "nats" "user" "" $c)) -}}
{{- fail "natsAuth.passwordKey: a password needs its user: set config.nats.user" -}}
{{- end -}}
{{- end -}}

{{/* The gRPC TLS mode of the run ("tls" or "mtls"), or "" when gRPC is plaintext. */}}
{{- define "saeflow.grpcTls" -}}
{{- $mode := dig "transport" "tls" "mode" "off" .Values.config -}}
{{- if ne $mode "off" }}{{ $mode }}{{ end -}}
{{- end -}}

{{/* Env of every role for gRPC TLS and NATS credentials and TLS, all read from mounted Secrets. */}}
{{- define "saeflow.securityEnv" -}}
{{- $auth := .Values.natsAuth -}}
{{- if include "saeflow.grpcTls" . }}
- name: SAEFLOW_TRANSPORT__TLS__CERT
  value: /etc/saeflow/grpc-tls/tls.crt
- name: SAEFLOW_TRANSPORT__TLS__KEY
  value: /etc/saeflow/grpc-tls/tls.key
- name: SAEFLOW_TRANSPORT__TLS__CA
  value: /etc/saeflow/grpc-tls/ca.crt
- name: SAEFLOW_TRANSPORT__TLS__HEALTH_ADDRESS
  value: {{ printf "0.0.0.0:%d" (int .Values.tls.healthPort) | quote }}
{{- end }}
{{- range $key, $env := dict "passwordKey" "PASSWORD_FILE" "tokenKey" "TOKEN_FILE" "credsKey" "CREDS_FILE" "nkeyKey" "NKEY_FILE" }}
{{- with index $auth $key }}
- name: {{ printf "SAEFLOW_NATS__%s" $env }}
  value: {{ printf "/etc/saeflow/nats-auth/%s" . | quote }}
{{- end }}
{{- end }}
{{- if $auth.tlsSecret }}
- name: SAEFLOW_NATS__TLS__CA
  value: /etc/saeflow/nats-tls/ca.crt
{{- if $auth.tlsClientCert }}
- name: SAEFLOW_NATS__TLS__CERT
  value: /etc/saeflow/nats-tls/tls.crt
- name: SAEFLOW_NATS__TLS__KEY
  value: /etc/saeflow/nats-tls/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/*
The pod template of one role. Args: root, role, extraEnv (env entries of this role),
mountModel (producers read the model and dataset), headless (the role's Service gives pods DNS names).
*/}}
{{- define "saeflow.podTemplate" -}}
{{- $root := .root -}}
{{- $v := index $root.Values .role -}}
{{- $gpu := int (default 0 $v.gpu) -}}
{{- $port := int $v.port -}}
{{- /* Under gRPC TLS the kubelet's gRPC probes, which cannot speak TLS, ask the plaintext health-only port. */ -}}
{{- $tls := include "saeflow.grpcTls" $root -}}
{{- $probePort := ternary (int $root.Values.tls.healthPort) $port (ne $tls "") -}}
{{- $persist := and $root.Values.persistence.enabled (has .role $root.Values.persistence.roles) -}}
metadata:
  labels:
    {{- include "saeflow.labels" . | nindent 4 }}
  annotations:
    {{- /* A Job's pod template is immutable: a changed run config makes `helm upgrade` fail rather than
    leave running pods and their replacements on different configs. */}}
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  # A role exits when the run stops; a failed pod is replaced by its Job, not restarted in place.
  restartPolicy: Never
  {{- if .headless }}
  # Indexed Job pods are named <job>-<index>; with the headless Service each has the DNS name <job>-<index>.<service>.
  subdomain: {{ include "saeflow.roleName" . }}
  {{- end }}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ int $v.terminationGracePeriodSeconds }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    fsGroup: 10001
    seccompProfile:
      type: RuntimeDefault
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .role }}
      image: {{ printf "%s:%s-%s" $root.Values.image.repository (default $root.Chart.AppVersion $root.Values.image.tag) (ternary "cuda" "cpu" (gt $gpu 0)) | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args: [{{ printf "services/%s/main.ts" .role | quote }}, "--config", "/etc/saeflow/run.yaml"]
      ports:
        - name: grpc
          containerPort: {{ $port }}
          protocol: TCP
        {{- if $tls }}
        - name: health
          containerPort: {{ int $root.Values.tls.healthPort }}
          protocol: TCP
        {{- end }}
      env:
        - name: {{ printf "SAEFLOW_%s__ADDRESS" (upper .role) }}
          value: {{ printf "0.0.0.0:%d" $port | quote }}
        - name: SAEFLOW_RUN__DIR
          value: {{ printf "%s/%s" $root.Values.persistence.mountPath (dig "run" "id" "local" $root.Values.config) | quote }}
        {{- if $root.Values.nats.deploy }}
        - name: NATS_URL
          value: {{ include "saeflow.natsUrl" $root | quote }}
        {{- end }}
        {{- if $root.Values.tls.caSecret }}
        - name: NODE_EXTRA_CA_CERTS
          value: {{ printf "/etc/saeflow/tls/%s" $root.Values.tls.caKey | quote }}
        {{- end }}
        {{- with include "saeflow.securityEnv" $root | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with .extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $v.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- /* "" is the whole server: NOT_SERVING until the role can work, so it gates startup and liveness. */}}
      startupProbe:
        grpc:
          port: {{ $probePort }}
          service: ""
        periodSeconds: 10
        failureThreshold: {{ div (add (int $v.startupSeconds) 9) 10 }}
      livenessProbe:
        grpc:
          port: {{ $probePort }}
          service: ""
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 6
      readinessProbe:
        grpc:
          port: {{ $probePort }}
          service: {{ include "saeflow.grpcService" .role | quote }}
        periodSeconds: 5
        timeoutSeconds: 5
        failureThreshold: 2
      resources:
        {{- if eq .role "buffer" }}
        {{- $memory := include "saeflow.bufferMemory" $root }}
        requests:
          cpu: {{ $v.cpu | quote }}
          memory: {{ $memory }}
        limits:
          memory: {{ $memory }}
        {{- else }}
        {{- $res := deepCopy (default (dict) $v.resources) }}
        {{- if gt $gpu 0 }}
        {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $gpu) (default (dict) $res.limits)) }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
        {{- end }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: [ALL]
      volumeMounts:
        - name: run-config
          mountPath: /etc/saeflow/run.yaml
          subPath: run.yaml
          readOnly: true
        - name: run-dir
          mountPath: {{ $root.Values.persistence.mountPath }}
        - name: tmp
          mountPath: /tmp
        {{- if .mountModel }}
        - name: model
          mountPath: /models
          readOnly: true
        {{- if $root.Values.datasetVolume }}
        - name: dataset
          mountPath: /datasets
          readOnly: true
        {{- end }}
        {{- end }}
        {{- if $root.Values.tls.caSecret }}
        - name: tls-ca
          mountPath: /etc/saeflow/tls
          readOnly: true
        {{- end }}
        {{- if $tls }}
        - name: grpc-tls
          mountPath: /etc/saeflow/grpc-tls
          readOnly: true
        {{- end }}
        {{- if $root.Values.natsAuth.secret }}
        - name: nats-auth
          mountPath: /etc/saeflow/nats-auth
          readOnly: true
        {{- end }}
        {{- if $root.Values.natsAuth.tlsSecret }}
        - name: nats-tls
          mountPath: /etc/saeflow/nats-tls
          readOnly: true
        {{- end }}
  volumes:
    - name: run-config
      configMap:
        name: {{ include "saeflow.fullname" $root }}-run
    - name: run-dir
      {{- if $persist }}
      persistentVolumeClaim:
        claimName: {{ default (printf "%s-runs" (include "saeflow.fullname" $root)) $root.Values.persistence.existingClaim }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- /* tsx compiles TypeScript into its cache under /tmp; the root filesystem stays read-only. */}}
    - name: tmp
      emptyDir: {}
    {{- if .mountModel }}
    - name: model
      {{- toYaml $root.Values.modelVolume | nindent 6 }}
    {{- if $root.Values.datasetVolume }}
    - name: dataset
      {{- toYaml $root.Values.datasetVolume | nindent 6 }}
    {{- end }}
    {{- end }}
    {{- if $root.Values.tls.caSecret }}
    - name: tls-ca
      secret:
        secretName: {{ $root.Values.tls.caSecret }}
    {{- end }}
    {{- if $tls }}
    - name: grpc-tls
      secret:
        secretName: {{ index $root.Values.tls.grpcSecrets .role }}
        defaultMode: 0440
    {{- end }}
    {{- if $root.Values.natsAuth.secret }}
    - name: nats-auth
      secret:
        secretName: {{ $root.Values.natsAuth.secret }}
        defaultMode: 0440
    {{- end }}
    {{- if $root.Values.natsAuth.tlsSecret }}
    - name: nats-tls
      secret:
        secretName: {{ $root.Values.natsAuth.tlsSecret }}
        defaultMode: 0440
    {{- end }}
{{- end -}}

{{/*
A role's Job: a release is one run, and each role completes when the run stops. Args: root, role,
replicas, indexed (each pod gets a completion index: the producer's dataset shard, the trainer's id
and share of the hook points, the buffer's shard), perIndex (backoffLimit counts each index's
failures apart, so one buffer shard's failures do not end the others).
*/}}
{{- define "saeflow.job" -}}
{{- $v := index .root.Values .role -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "saeflow.roleName" . }}
  labels:
    {{- include "saeflow.labels" . | nindent 4 }}
spec:
  {{- if .indexed }}
  completionMode: Indexed
  {{- end }}
  completions: {{ .replicas }}
  parallelism: {{ .replicas }}
  {{- if .perIndex }}
  backoffLimitPerIndex: {{ int $v.backoffLimit }}
  {{- else }}
  backoffLimit: {{ int $v.backoffLimit }}
  {{- end }}
  # A replacement starts only once the failed pod is gone, so no two pods hold one GPU or two pools.
  podReplacementPolicy: Failed
  podFailurePolicy:
    rules:
      # Exit code 2 is a config the role refused: retrying cannot help.
      - action: FailJob
        onExitCodes:
          containerName: {{ .role }}
          operator: In
          values: [2]
      # Evictions and preemptions are not the role's failures and do not count against backoffLimit.
      - action: Ignore
        onPodConditions:
          - type: DisruptionTarget
            status: "True"
  template:
    {{- include "saeflow.podTemplate" . | nindent 4 }}
{{- end -}}

{{/*
A role's Service on its gRPC port; headless for indexed roles so each pod has a DNS name. With index,
the Service of one pod of the role's Indexed Job, <role name>-<index> (a buffer shard's).
*/}}
{{- define "saeflow.service" -}}
{{- $v := index .root.Values .role -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "saeflow.roleName" . }}{{ if hasKey . "index" }}-{{ .index }}{{ end }}
  labels:
    {{- include "saeflow.labels" . | nindent 4 }}
spec:
  {{- if .headless }}
  clusterIP: None
  publishNotReadyAddresses: true
  {{- end }}
  selector:
    {{- include "saeflow.selectorLabels" . | nindent 4 }}
    {{- if hasKey . "index" }}
    batch.kubernetes.io/job-completion-index: {{ .index | quote }}
    {{- end }}
  ports:
    - name: grpc
      port: {{ int $v.port }}
      targetPort: grpc
      protocol: TCP
      {{- if not (include "saeflow.grpcTls" .root) }}
      appProtocol: kubernetes.io/h2c
      {{- end }}
{{- end -}}
