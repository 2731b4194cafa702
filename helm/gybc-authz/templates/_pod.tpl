{{/*
The containers and volumes both workloads run: the chart's main Deployment (Envoy in front of
the upstream) and the key service's (Envoy in front of `gybc-authz key-service`). Envoy, the
gybc-authz container and the module's init container are the same in both pods; only the
ConfigMap holding Envoy's bootstrap differs (gybc-authz.podVolumes' envoyConfigMap).
*/}}

{{/*
Whether gybcAuthz.keyFile names a Secret or ConfigMap to mount ("true" or "").
*/}}
{{- define "gybc-authz.hasKeyFile" -}}
{{- if or .Values.gybcAuthz.keyFile.existingSecret .Values.gybcAuthz.keyFile.existingConfigMap }}true{{ end }}
{{- end }}

{{/*
Module mode: the init container that copies the module out of the gybc-authz image. The image
is distroless (no shell, no cp): it carries a one-purpose copy program. libgcc_s goes along:
the module needs it, and Envoy's distroless image lacks it.
*/}}
{{- define "gybc-authz.installModuleContainer" -}}
{{- $a := .Values.gybcAuthz -}}
- name: install-module
  image: "{{ $a.image.repository }}:{{ $a.image.tag | default .Chart.AppVersion }}"
  imagePullPolicy: {{ $a.image.pullPolicy }}
  command:
    - /usr/local/bin/copy-file
    - {{ include "gybc-authz.moduleDir" . }}/lib{{ include "gybc-authz.moduleName" . }}.so
    - {{ include "gybc-authz.moduleDir" . }}/libgcc_s.so.1
    - /module
  resources:
    {{- toYaml .Values.module.installResources | nindent 4 }}
  securityContext:
    {{- include "gybc-authz.containerSecurityContext" (list . $a.securityContext) | nindent 4 }}
  volumeMounts:
    - name: module
      mountPath: /module
{{- end }}

{{/*
Envoy: the pod's front door, reading its bootstrap from the `envoy-config` volume. In module
mode the engine runs in it, with the engine's files and environment.
*/}}
{{- define "gybc-authz.envoyContainer" -}}
{{- $e := .Values.envoy }}
{{- $module := eq .Values.mode "module" -}}
- name: envoy
  image: "{{ $e.image.repository }}:{{ $e.image.tag }}"
  imagePullPolicy: {{ $e.image.pullPolicy }}
  args:
    - -c
    - /etc/envoy/envoy.yaml
    # One Envoy per pod: no shared memory for hot restart (and no writable /dev/shm needed).
    - --disable-hot-restart
    - --concurrency
    - {{ $e.concurrency | quote }}
    - --log-level
    - {{ $e.logLevel }}
  {{- if $module }}
  env:
    # Where Envoy looks for lib<name>.so of each dynamic module ...
    - name: ENVOY_DYNAMIC_MODULES_SEARCH_PATH
      value: {{ include "gybc-authz.moduleDir" . }}
    # ... and where the loader finds the module's libgcc_s (Envoy needs none of its own).
    - name: LD_LIBRARY_PATH
      value: {{ include "gybc-authz.moduleDir" . }}
    {{- with include "gybc-authz.engineEnv" . | trim }}
    {{- . | nindent 4 }}
    {{- end }}
  {{- end }}
  ports:
    - name: http
      containerPort: {{ $e.ports.http }}
      protocol: TCP
    - name: envoy-stats
      containerPort: {{ $e.ports.stats }}
      protocol: TCP
  # /ready through the stats listener: 200 once Envoy's listeners are up.
  readinessProbe:
    httpGet: { path: /ready, port: envoy-stats }
    periodSeconds: 5
    timeoutSeconds: 2
    failureThreshold: 2
  livenessProbe:
    httpGet: { path: /ready, port: envoy-stats }
    periodSeconds: 10
    timeoutSeconds: 2
    failureThreshold: 3
  lifecycle:
    # Keep serving while the pod is removed from the Service's endpoints.
    preStop:
      sleep: { seconds: {{ $e.preStopSleepSeconds }} }
  resources:
    {{- toYaml $e.resources | nindent 4 }}
  securityContext:
    {{- include "gybc-authz.containerSecurityContext" (list . $e.securityContext) | nindent 4 }}
  volumeMounts:
    - name: envoy-config
      mountPath: /etc/envoy
      readOnly: true
    - name: envoy-tmp
      mountPath: /tmp
    {{- if $module }}
    # The engine's files, where the daemon would find them (the config names the key
    # file's path).
    {{- include "gybc-authz.engineMounts" . | nindent 4 }}
    - name: module
      mountPath: {{ include "gybc-authz.moduleDir" . }}
      readOnly: true
    {{- end }}
{{- end }}

{{/*
Sidecar mode: gybc-authz, answering Envoy's Check on 127.0.0.1.
*/}}
{{- define "gybc-authz.daemonContainer" -}}
{{- $a := .Values.gybcAuthz -}}
- name: gybc-authz
  image: "{{ $a.image.repository }}:{{ $a.image.tag | default .Chart.AppVersion }}"
  imagePullPolicy: {{ $a.image.pullPolicy }}
  args: [serve, --config, {{ include "gybc-authz.configPath" . }}]
  ports:
    - name: authz-http
      containerPort: {{ $a.ports.http }}
      protocol: TCP
  {{- with include "gybc-authz.engineEnv" . | trim }}
  env:
    {{- . | nindent 4 }}
  {{- end }}
  livenessProbe:
    httpGet: { path: /healthz, port: authz-http }
    {{- toYaml $a.livenessProbe | nindent 4 }}
  readinessProbe:
    httpGet: { path: /readyz, port: authz-http }
    {{- toYaml $a.readinessProbe | nindent 4 }}
  lifecycle:
    # Outlive Envoy: SIGTERM (then the daemon's drain) only after Envoy has stopped sending.
    preStop:
      sleep: { seconds: {{ $a.preStopSleepSeconds }} }
  resources:
    {{- toYaml $a.resources | nindent 4 }}
  securityContext:
    {{- include "gybc-authz.containerSecurityContext" (list . $a.securityContext) | nindent 4 }}
  volumeMounts:
    {{- include "gybc-authz.engineMounts" . | nindent 4 }}
{{- end }}

{{/*
The config file and, when there is one, the key file, mounted into the container that reads
them (gybc-authz, Envoy in module mode, the key service). Returns YAML (a list).
*/}}
{{- define "gybc-authz.engineMounts" -}}
- name: config
  mountPath: {{ include "gybc-authz.configPath" . }}
  subPath: config.yaml
  readOnly: true
{{- if include "gybc-authz.hasKeyFile" . }}
# A directory mount (not subPath), so updates reach the pod and the engine reloads.
- name: keys
  mountPath: {{ include "gybc-authz.keyFileDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
The volumes those containers mount. Call with (dict "root" $ "envoyConfigMap" <name>).
Returns YAML (a list).
*/}}
{{- define "gybc-authz.podVolumes" -}}
{{- $root := .root }}
{{- $a := $root.Values.gybcAuthz -}}
- name: config
  configMap:
    name: {{ include "gybc-authz.fullname" $root }}-config
- name: envoy-config
  configMap:
    name: {{ .envoyConfigMap }}
- name: envoy-tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- if eq $root.Values.mode "module" }}
# On disk, not in memory: tmpfs pages would count against the pod's memory for as long
# as it runs.
- name: module
  emptyDir:
    sizeLimit: {{ $root.Values.module.volumeSizeLimit }}
{{- end }}
{{- if $a.keyFile.existingSecret }}
- name: keys
  secret:
    secretName: {{ $a.keyFile.existingSecret }}
    items:
      - { key: {{ $a.keyFile.key | quote }}, path: {{ $a.keyFile.key | quote }} }
{{- else if $a.keyFile.existingConfigMap }}
- name: keys
  configMap:
    name: {{ $a.keyFile.existingConfigMap }}
    items:
      - { key: {{ $a.keyFile.key | quote }}, path: {{ $a.keyFile.key | quote }} }
{{- end }}
{{- end }}
