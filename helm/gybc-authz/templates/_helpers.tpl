{{/*
The chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "gybc-authz.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: `<release>-<chart>`, or the release name alone when it already contains the
chart name; truncated to 63 characters.
*/}}
{{- define "gybc-authz.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
`<chart>-<version>` for the helm.sh/chart label.
*/}}
{{- define "gybc-authz.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "gybc-authz.labels" -}}
helm.sh/chart: {{ include "gybc-authz.chart" . }}
{{ include "gybc-authz.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.gybcAuthz.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels: name and instance only, so they never change on upgrade.
*/}}
{{- define "gybc-authz.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gybc-authz.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The key service's resources (keyService.enabled): `<fullname>-key-service`.
*/}}
{{- define "gybc-authz.keyService.fullname" -}}
{{- printf "%s-key-service" (include "gybc-authz.fullname" . | trunc 51 | trimSuffix "-") }}
{{- end }}

{{/*
The key service's selector labels. Its own `app.kubernetes.io/name`, so the main workload's
selectors (name and instance) never pick its pods: the main Service must not send the
upstream's traffic to the key service's Envoy, nor count its pods in the main budget.
*/}}
{{- define "gybc-authz.keyService.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-key-service" (include "gybc-authz.name" . | trunc 51 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every resource of the key service.
*/}}
{{- define "gybc-authz.keyService.labels" -}}
helm.sh/chart: {{ include "gybc-authz.chart" . }}
{{ include "gybc-authz.keyService.selectorLabels" . }}
app.kubernetes.io/component: key-service
app.kubernetes.io/part-of: {{ include "gybc-authz.name" . }}
app.kubernetes.io/version: {{ .Values.gybcAuthz.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that pick out the `helm test` pod: the release's, but not the selector labels, so that
the Service and the PodDisruptionBudget never select it.
*/}}
{{- define "gybc-authz.testPodLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{/*
The ServiceAccount the pods run as.
*/}}
{{- define "gybc-authz.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gybc-authz.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
A container's securityContext: the shared hardened defaults, with the container's own
settings merged over them. Call with (list $ .Values.<container>.securityContext).
*/}}
{{- define "gybc-authz.containerSecurityContext" -}}
{{- $root := index . 0 }}
{{- $own := index . 1 | default dict }}
{{- toYaml (mergeOverwrite (deepCopy $root.Values.containerSecurityContext) (deepCopy $own)) }}
{{- end }}

{{/*
The identity header names the daemon sets, from gybcAuthz.config.headers over the defaults.
Returns YAML (a list); use with fromYamlArray.
*/}}
{{- define "gybc-authz.identityHeaders" -}}
{{- $defaults := dict "tenant_id" "x-tenant-id" "user_id" "x-user-id" "auth_method" "x-auth-method" "api_key_id" "x-api-key-id" "scopes" "x-scopes" "impersonated_by" "x-impersonated-by" }}
{{- $h := merge (deepCopy (.Values.gybcAuthz.config.headers | default dict)) $defaults }}
{{- toYaml (list $h.tenant_id $h.user_id $h.auth_method $h.api_key_id $h.scopes $h.impersonated_by) }}
{{- end }}

{{/*
Whether Redis is in use by the daemon's config ("true" or "").
*/}}
{{- define "gybc-authz.usesRedis" -}}
{{- $c := .Values.gybcAuthz.config }}
{{- $ks := $c.key_store | default dict }}
{{- $rl := $c.rate_limit | default dict }}
{{- if or (eq (toString $ks.type) "redis") (eq (toString $rl.backend) "redis") }}true{{ end }}
{{- end }}

{{/*
Stops the render on contradictory values, with a message that says what to change. Included
by every template that depends on these values, so `helm template` fails as `helm install` does.
*/}}
{{- define "gybc-authz.validate" -}}
{{- $v := .Values }}
{{- $a := $v.gybcAuthz }}
{{- $module := eq $v.mode "module" }}
{{- if and $a.keyFile.existingSecret $a.keyFile.existingConfigMap }}
{{- fail "gybcAuthz.keyFile: set existingSecret or existingConfigMap, not both" }}
{{- end }}
{{- $ks := $a.config.key_store | default dict }}
{{- if and (or $a.keyFile.existingSecret $a.keyFile.existingConfigMap) (hasKey $a.config "key_store") }}
{{- fail "gybcAuthz.config.key_store is set by the chart when gybcAuthz.keyFile names a Secret or ConfigMap: remove it from config" }}
{{- end }}
{{- if eq (toString $ks.type) "file" }}
{{- fail "gybcAuthz.config.key_store.type is file: name the key file's source in gybcAuthz.keyFile.existingSecret or existingConfigMap instead (the chart mounts it and sets key_store)" }}
{{- end }}
{{- $redisCfg := $a.config.redis | default dict }}
{{- if and $a.redis.urls (hasKey $redisCfg "urls") }}
{{- fail "Redis URLs are set twice: use gybcAuthz.redis.urls, not gybcAuthz.config.redis.urls" }}
{{- end }}
{{- if and $a.redis.urlKey (or $a.redis.urls (hasKey $redisCfg "urls")) }}
{{- fail "Redis URLs are set twice: gybcAuthz.redis.urlKey takes them from the Secret, so leave gybcAuthz.redis.urls and gybcAuthz.config.redis.urls empty" }}
{{- end }}
{{- if and $a.redis.existingSecret $a.redis.passwordKey (or (hasKey $redisCfg "password_env") (hasKey $redisCfg "password_file")) }}
{{- fail "The Redis password is set twice: gybcAuthz.redis.existingSecret/passwordKey, and gybcAuthz.config.redis.password_env or password_file. Keep one" }}
{{- end }}
{{- $sentinel := $a.redis.sentinel }}
{{- if and $sentinel.masterName (or $a.redis.urls $a.redis.urlKey $a.redis.cluster (hasKey $redisCfg "urls")) }}
{{- fail "gybcAuthz.redis.sentinel names the primary: leave gybcAuthz.redis.urls, urlKey and cluster (and gybcAuthz.config.redis.urls) empty" }}
{{- end }}
{{- if and $sentinel.masterName (not $sentinel.urls) }}
{{- fail "gybcAuthz.redis.sentinel.masterName needs gybcAuthz.redis.sentinel.urls: every sentinel" }}
{{- end }}
{{- if and $sentinel.urls (not $sentinel.masterName) }}
{{- fail "gybcAuthz.redis.sentinel.urls needs gybcAuthz.redis.sentinel.masterName: the name the sentinels monitor the primary under" }}
{{- end }}
{{- if and $sentinel.passwordKey (not $a.redis.existingSecret) }}
{{- fail "gybcAuthz.redis.sentinel.passwordKey names an item of gybcAuthz.redis.existingSecret, which is empty" }}
{{- end }}
{{- if and $sentinel.masterName (hasKey $redisCfg "sentinel") (hasKey (get $redisCfg "sentinel") "master_name") }}
{{- fail "The Redis sentinels are set twice: use gybcAuthz.redis.sentinel, not gybcAuthz.config.redis.sentinel.master_name" }}
{{- end }}
{{- if and (include "gybc-authz.usesRedis" .) (not (or $a.redis.urls $redisCfg.urls (and $a.redis.existingSecret $a.redis.urlKey) $sentinel.masterName (hasKey $redisCfg "sentinel"))) }}
{{- fail "gybcAuthz.config uses Redis (key_store.type or rate_limit.backend is redis) but no Redis is named: set gybcAuthz.redis.urls (or gybcAuthz.redis.sentinel)" }}
{{- end }}
{{- if and $a.redis.urlKey (not $a.redis.existingSecret) }}
{{- fail "gybcAuthz.redis.urlKey names an item of gybcAuthz.redis.existingSecret, which is empty" }}
{{- end }}
{{- if and $v.app.enabled $v.envoy.upstream.address }}
{{- fail "app.enabled runs the upstream in the pod, so envoy.upstream.address must be empty (set envoy.upstream.address=\"\")" }}
{{- end }}
{{- if and (not $v.app.enabled) (not $v.envoy.upstream.address) }}
{{- fail "Envoy has no upstream: set app.enabled=true (and app.image.repository), or envoy.upstream.address" }}
{{- end }}
{{- if and $v.app.enabled (not $v.app.image.repository) }}
{{- fail "app.enabled needs app.image.repository" }}
{{- end }}
{{- /* In module mode no daemon listens: its ports are only written into the config file. */}}
{{- $ports := list (int $v.envoy.ports.http) (int $v.envoy.ports.stats) (int $v.envoy.ports.admin) }}
{{- if not $module }}{{ $ports = concat (list (int $a.ports.grpc) (int $a.ports.http)) $ports }}{{ end }}
{{- if $v.app.enabled }}{{ $ports = append $ports (int $v.app.port) }}{{ end }}
{{- if ne (len $ports) (len (uniq $ports)) }}
{{- fail (printf "Two containers of the pod would listen on one port (gybcAuthz.ports, envoy.ports, app.port): %v" $ports) }}
{{- end }}
{{- if $v.app.enabled }}
{{- include "gybc-authz.validateAppProbes" . }}
{{- end }}
{{- if $v.keyService.enabled }}
{{- include "gybc-authz.validateKeyService" (dict "root" . "ports" $ports) }}
{{- end }}
{{- if and $module $v.serviceMonitor.enabled (not $v.serviceMonitor.scrapeEnvoy) }}
{{- fail "serviceMonitor.scrapeEnvoy=false leaves nothing to scrape in module mode: gybc-authz's metrics are on Envoy's /stats/prometheus there" }}
{{- end }}
{{- if and $v.podDisruptionBudget.enabled (not (kindIs "invalid" $v.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both (set the other to null)" }}
{{- end }}
{{- if and $v.podDisruptionBudget.enabled (kindIs "invalid" $v.podDisruptionBudget.minAvailable) (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable) }}
{{- fail "podDisruptionBudget.enabled needs minAvailable or maxUnavailable" }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas is greater than autoscaling.maxReplicas" }}
{{- end }}
{{- if and $v.autoscaling.enabled (not $v.autoscaling.targetCPUUtilizationPercentage) (not $v.autoscaling.targetMemoryUtilizationPercentage) }}
{{- fail "autoscaling.enabled needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- if $module }}
{{- if le (int $v.terminationGracePeriodSeconds) (int $v.envoy.preStopSleepSeconds) }}
{{- fail "terminationGracePeriodSeconds must exceed envoy.preStopSleepSeconds, or Envoy is killed while it still serves" }}
{{- end }}
{{- else }}
{{- if lt (int $a.preStopSleepSeconds) (int $v.envoy.preStopSleepSeconds) }}
{{- fail "gybcAuthz.preStopSleepSeconds must be at least envoy.preStopSleepSeconds: otherwise the daemon stops while Envoy still sends it checks, and clients get 503" }}
{{- end }}
{{- if le (int $v.terminationGracePeriodSeconds) (add (int $a.preStopSleepSeconds) (int $a.shutdownGraceSeconds)) }}
{{- fail "terminationGracePeriodSeconds must exceed gybcAuthz.preStopSleepSeconds + gybcAuthz.shutdownGraceSeconds, or in-flight checks are killed" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
keyService.enabled: what the key service's pod needs. Call with (dict "root" $ "ports" <the
main pod's ports>): its pod has the same Envoy and gybc-authz ports, without the app's.
*/}}
{{- define "gybc-authz.validateKeyService" -}}
{{- $v := .root.Values }}
{{- $k := $v.keyService }}
{{- $ks := $v.gybcAuthz.config.key_store | default dict }}
{{- if ne (toString $ks.type) "redis" }}
{{- fail "keyService.enabled needs the Redis key store (gybcAuthz.config.key_store.type: redis, and gybcAuthz.redis): the key service writes keys that every replica must see, and a key file mounted from a Secret or ConfigMap is read-only" }}
{{- end }}
{{- $ports := .ports }}
{{- if $v.app.enabled }}{{ $ports = without $ports (int $v.app.port) }}{{ end }}
{{- if has (int $k.port) $ports }}
{{- fail (printf "keyService.port %d is taken in the key service's pod by another container (gybcAuthz.ports, envoy.ports): %v" (int $k.port) $ports) }}
{{- end }}
{{- if has (int $k.adminPort) (append $ports (int $k.port)) }}
{{- fail (printf "keyService.adminPort %d is taken in the key service's pod (keyService.port, gybcAuthz.ports, envoy.ports): %v" (int $k.adminPort) (append $ports (int $k.port))) }}
{{- end }}
{{- if lt (int $k.preStopSleepSeconds) (int $v.envoy.preStopSleepSeconds) }}
{{- fail "keyService.preStopSleepSeconds must be at least envoy.preStopSleepSeconds: otherwise the key service stops while Envoy still sends it requests, and clients get 503" }}
{{- end }}
{{- if le (int $v.terminationGracePeriodSeconds) (int $k.preStopSleepSeconds) }}
{{- fail "terminationGracePeriodSeconds must exceed keyService.preStopSleepSeconds, or the key service is killed with requests in flight" }}
{{- end }}
{{- $pdb := $k.podDisruptionBudget }}
{{- if and $pdb.enabled (not (kindIs "invalid" $pdb.minAvailable)) (not (kindIs "invalid" $pdb.maxUnavailable)) }}
{{- fail "keyService.podDisruptionBudget: set minAvailable or maxUnavailable, not both (set the other to null)" }}
{{- end }}
{{- if and $pdb.enabled (kindIs "invalid" $pdb.minAvailable) (kindIs "invalid" $pdb.maxUnavailable) }}
{{- fail "keyService.podDisruptionBudget.enabled needs minAvailable or maxUnavailable" }}
{{- end }}
{{- end }}

{{/*
The app listens on 127.0.0.1 only (values.yaml, app.port), and the kubelet probes the pod IP:
a network probe on app.port can never succeed, and the app container declares no port a name
could refer to. Through Envoy's listener, only a health path answers without credentials.
*/}}
{{- define "gybc-authz.validateAppProbes" -}}
{{- $v := .Values }}
{{- range $which := list "livenessProbe" "readinessProbe" "startupProbe" }}
{{- $probe := index $v.app $which | default dict }}
{{- range $kind := list "httpGet" "tcpSocket" "grpc" }}
{{- with index $probe $kind }}
{{- $port := .port }}
{{- if kindIs "string" $port }}
{{- fail (printf "app.%s.%s.port is the name %q, but the app container declares no ports (it listens on 127.0.0.1): give Envoy's listener port by number, e.g. %d" $which $kind $port (int $v.envoy.ports.http)) }}
{{- end }}
{{- if eq (int $port) (int $v.app.port) }}
{{- fail (printf "app.%s probes app.port %d on the pod IP, where the app must not listen (it trusts the identity headers, so it listens on 127.0.0.1 for Envoy only): probe through Envoy, e.g. httpGet {path: %s, port: %d}, or use an exec probe" $which (int $port) (first $v.envoy.healthPaths | default "/healthz") (int $v.envoy.ports.http)) }}
{{- end }}
{{- if and (eq $kind "httpGet") (eq (int $port) (int $v.envoy.ports.http)) }}
{{- $path := regexReplaceAll "[?#].*$" (.path | default "/") "" }}
{{- if not (has $path $v.envoy.healthPaths) }}
{{- fail (printf "app.%s.httpGet goes through Envoy to %s, which is not in envoy.healthPaths: Envoy would check it and answer 401. Add it to envoy.healthPaths" $which $path) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
