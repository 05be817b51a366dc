{{/*
nearcache chart helpers.

Every helper reads the chart's values through "nearcache.values", so the same
templates work in two contexts:
  * inside this chart:            .Values is this chart's values;
  * included by an application chart that depends on this one: .Values is the
    application's values and ours are under .Values.nearcache (Helm merges this
    chart's defaults in there).
*/}}

{{- define "nearcache.values" -}}
{{- if .Values.nearcache -}}
{{- toYaml .Values.nearcache -}}
{{- else -}}
{{- toYaml .Values -}}
{{- end -}}
{{- end -}}

{{/* Name of the ConfigMap / Secret / Service; identical from either context. */}}
{{- define "nearcache.fullname" -}}
{{- $v := include "nearcache.values" . | fromYaml -}}
{{- if $v.fullnameOverride -}}
{{- $v.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "nearcache" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-nearcache" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "nearcache.labels" -}}
app.kubernetes.io/name: nearcache
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "nearcache.image" -}}
{{- $v := include "nearcache.values" . | fromYaml -}}
{{- printf "%s:%s" $v.image.repository ($v.image.tag | default "0.1.0") -}}
{{- end -}}

{{- define "nearcache.secretName" -}}
{{- $v := include "nearcache.values" . | fromYaml -}}
{{- if $v.upstream.existingSecret -}}
{{- $v.upstream.existingSecret -}}
{{- else -}}
{{- include "nearcache.fullname" . -}}
{{- end -}}
{{- end -}}

{{/*
The configuration file (TOML) the ConfigMap carries. listen and admin are not here:
the sidecar's command line sets them. Keys: conf/nearcache.toml.
*/}}
{{- define "nearcache.config" -}}
{{- $v := include "nearcache.values" . | fromYaml -}}
# Rendered by the nearcache Helm chart; every key is documented in conf/nearcache.toml.
# listen and admin come from the sidecar's command line.
log_format = {{ $v.logFormat | toJson }}
shutdown_grace = {{ $v.shutdownGrace | toString | toJson }}

[server]
max_clients = {{ $v.server.maxClients | int }}
max_pending_per_client = {{ $v.server.maxPendingPerClient | int }}

[upstream]
# The password arrives as REDIS_PASSWORD from a Secret.
url = {{ $v.upstream.url | toJson }}
pool_size = {{ $v.upstream.poolSize | int }}
connect_timeout = {{ $v.upstream.connectTimeout | toString | toJson }}
command_timeout = {{ $v.upstream.commandTimeout | toString | toJson }}
reconnect_backoff_max = {{ $v.upstream.reconnectBackoffMax | toString | toJson }}
{{- if $v.upstream.tls.existingSecret }}

[upstream.tls]
ca_file = "/etc/nearcache-tls/ca.crt"
{{- if $v.upstream.tls.clientCert }}
cert_file = "/etc/nearcache-tls/tls.crt"
key_file = "/etc/nearcache-tls/tls.key"
{{- end }}
{{- if $v.upstream.tls.serverName }}
server_name = {{ $v.upstream.tls.serverName | toJson }}
{{- end }}
{{- end }}

[cache]
enabled = {{ $v.cache.enabled }}
max_bytes = {{ $v.cache.maxBytes | toString | toJson }}
invalidation = {{ $v.cache.invalidation | toJson }}
configure_upstream = {{ $v.cache.configureUpstream }}
default_ttl = {{ $v.cache.defaultTtl | toString | toJson }}
feed_health_interval = {{ $v.cache.feedHealthInterval | toString | toJson }}
{{- range $v.cache.policies }}

[[cache.policies]]
pattern = {{ .pattern | toJson }}
{{- if and .ttl (ne (toString .cache) "false") }}
ttl = {{ .ttl | toString | toJson }}
{{- else }}
cache = false
{{- end }}
{{- end }}
{{- if $v.tdengine.enabled }}

[tdengine]
{{- if $v.tdengine.dsn }}
dsn = {{ $v.tdengine.dsn | toJson }}
{{- end }}
timeout = {{ $v.tdengine.timeout | toString | toJson }}
on_error = {{ $v.tdengine.onError | toJson }}
on_invalid_key = {{ $v.tdengine.onInvalidKey | toJson }}
format = {{ $v.tdengine.format | toJson }}
max_concurrent_queries = {{ $v.tdengine.maxConcurrentQueries | int }}
pool_size = {{ $v.tdengine.poolSize | int }}
negative_ttl = {{ $v.tdengine.negativeTtl | toString | toJson }}
breaker_failures = {{ $v.tdengine.breakerFailures | int }}
breaker_cooldown = {{ $v.tdengine.breakerCooldown | toString | toJson }}
{{- range $v.tdengine.routes }}

[[tdengine.routes]]
key = {{ .key | toJson }}
sql = {{ .sql | toJson }}
ttl = {{ .ttl | default "15m" | toString | toJson }}
{{- if .params }}
[tdengine.routes.params]
{{- range $name, $p := .params }}
{{ $name | toJson }} = { {{- if $p.pattern }}pattern = {{ $p.pattern | toJson }}, {{ end }}{{- if $p.allow }}allow = {{ $p.allow | toJson }}, {{ end }}quote = {{ $p.quote | default false }} }
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{ end -}}

{{/*
Pod annotations that roll the pods when the configuration changes:
  annotations:
    {{- include "nearcache.podAnnotations" . | nindent 8 }}
*/}}
{{- define "nearcache.podAnnotations" -}}
checksum/nearcache-config: {{ include "nearcache.config" . | sha256sum }}
{{- end -}}

{{/*
The sidecar container: one list item for a pod's `containers:`.
  containers:
    {{- include "nearcache.sidecar" . | nindent 8 }}
It answers the application on 127.0.0.1:<listenPort> (6379) and serves /metrics,
/healthz and /readyz on <admin.port> (9121).
*/}}
{{- define "nearcache.sidecar" -}}
{{- $v := include "nearcache.values" . | fromYaml -}}
- name: {{ $v.sidecar.name | default "nearcache" }}
  image: {{ include "nearcache.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  args:
    - --listen
    - {{ printf "127.0.0.1:%d" ($v.listenPort | int) | quote }}
    - --admin
    {{- if $v.admin.bindPodIP }}
    - {{ printf "$(POD_IP):%d" ($v.admin.port | int) | quote }}
    {{- else }}
    - {{ printf "0.0.0.0:%d" ($v.admin.port | int) | quote }}
    {{- end }}
    - --config
    - /etc/nearcache/nearcache.toml
    - --log-format
    - {{ $v.logFormat | quote }}
  env:
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    - name: RUST_LOG
      value: {{ $v.logLevel | quote }}
    {{- if or $v.upstream.password $v.upstream.existingSecret }}
    - name: REDIS_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ include "nearcache.secretName" . }}
          key: {{ $v.upstream.existingSecretKey | default "redis-password" }}
    {{- end }}
    {{- if $v.tdengine.existingSecret }}
    - name: TDENGINE_DSN
      valueFrom:
        secretKeyRef:
          name: {{ $v.tdengine.existingSecret }}
          key: {{ $v.tdengine.existingSecretKey | default "tdengine-dsn" }}
    {{- end }}
    {{- with $v.sidecar.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: nc-admin
      containerPort: {{ $v.admin.port | int }}
      protocol: TCP
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ $v.admin.port | int }}
    {{- toYaml $v.sidecar.livenessProbe | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ $v.admin.port | int }}
    {{- toYaml $v.sidecar.readinessProbe | nindent 4 }}
  {{- if $v.sidecar.preStopSleepSeconds }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", {{ $v.sidecar.preStopSleepSeconds | toString | quote }}]
  {{- end }}
  resources:
    {{- toYaml $v.sidecar.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.sidecar.securityContext | nindent 4 }}
  volumeMounts:
    - name: nearcache-config
      mountPath: /etc/nearcache
      readOnly: true
    {{- if $v.upstream.tls.existingSecret }}
    - name: nearcache-tls
      mountPath: /etc/nearcache-tls
      readOnly: true
    {{- end }}
{{- end -}}

{{/*
The sidecar's volumes: list items for the pod's `volumes:`.
  volumes:
    {{- include "nearcache.volumes" . | nindent 8 }}
*/}}
{{- define "nearcache.volumes" -}}
{{- $v := include "nearcache.values" . | fromYaml -}}
- name: nearcache-config
  configMap:
    name: {{ include "nearcache.fullname" . }}
{{- if $v.upstream.tls.existingSecret }}
- name: nearcache-tls
  secret:
    secretName: {{ $v.upstream.tls.existingSecret }}
{{- end }}
{{- end -}}
