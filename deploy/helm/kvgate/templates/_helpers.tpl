{{/*
The name of every object of the release: the release name, or fullnameOverride.
*/}}
{{- define "kvgate.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The InferencePool kvgate serves (and renders when inferencePool.create is set).
*/}}
{{- define "kvgate.poolName" -}}
{{- default (include "kvgate.fullname" .) .Values.inferencePool.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The InferencePool's API group, from inferencePool.apiVersion.
*/}}
{{- define "kvgate.poolGroup" -}}
{{- (split "/" .Values.inferencePool.apiVersion)._0 -}}
{{- end -}}

{{/*
The model servers' labels: inferencePool.modelServers.matchLabels, or `app: <pool name>` when
none are given (an empty default, so that --set adds to nothing).
*/}}
{{- define "kvgate.modelServerLabels" -}}
{{- $labels := .Values.inferencePool.modelServers.matchLabels | default (dict "app" (include "kvgate.poolName" .)) -}}
{{- toYaml $labels -}}
{{- end -}}

{{- define "kvgate.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kvgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kvgate.image" -}}
{{- $image := .Values.inferenceExtension.image -}}
{{- $tag := default .Chart.AppVersion $image.tag -}}
{{- if $image.hub -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $image.hub) $image.name $tag -}}
{{- else -}}
{{- printf "%s:%s" $image.name $tag -}}
{{- end -}}
{{- end -}}

{{/*
The Secret holding the picker API's token: the existing one named, or the chart's own; empty
when there is none.
*/}}
{{- define "kvgate.pickerTokenSecret" -}}
{{- $t := .Values.inferenceExtension.pickerApi.token -}}
{{- if $t.existingSecret -}}
{{- $t.existingSecret -}}
{{- else if $t.create -}}
{{- printf "%s-picker-api" (include "kvgate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
Where the picker API's token Secret is mounted (a folder: a file mounted with subPath would not
see the Secret rotate).
*/}}
{{- define "kvgate.pickerTokenDir" -}}
/var/run/secrets/kvgate/picker-api
{{- end -}}

{{/*
Whether the replicas share what they learn (kvgate's `cluster:`): cluster.enabled with more than
one replica. "true" or empty.
*/}}
{{- define "kvgate.clustered" -}}
{{- if and .Values.inferenceExtension.cluster.enabled (gt (int .Values.inferenceExtension.replicas) 1) -}}
true
{{- end -}}
{{- end -}}

{{/*
The headless Service whose addresses are the replicas (every pod, ready or not).
*/}}
{{- define "kvgate.peersService" -}}
{{- printf "%s-peers" (include "kvgate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The Secret holding the cluster token: the existing one named, or the chart's own.
*/}}
{{- define "kvgate.clusterTokenSecret" -}}
{{- $t := .Values.inferenceExtension.cluster.token -}}
{{- if $t.existingSecret -}}
{{- $t.existingSecret -}}
{{- else -}}
{{- printf "%s-cluster" (include "kvgate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
Where the cluster token's Secret is mounted (a folder, as the picker API's).
*/}}
{{- define "kvgate.clusterTokenDir" -}}
/var/run/secrets/kvgate/cluster
{{- end -}}

{{/*
The pods' default spread with several replicas: over nodes, as far as the scheduler can.
*/}}
{{- define "kvgate.defaultSpread" -}}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "kvgate.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/*
kvgate's config file: the listeners on every address at the chart's ports, and one pool sourced
from the InferencePool, with inferenceExtension.models/scheduler/poolConfig/config filled in.
The chart's own keys win over poolConfig and config.
*/}}
{{- define "kvgate.config" -}}
{{- $ie := .Values.inferenceExtension -}}
{{- $ref := dict "name" (include "kvgate.poolName" .) "namespace" .Release.Namespace -}}
{{- if ne (include "kvgate.poolGroup" .) "inference.networking.k8s.io" -}}
{{- $_ := set $ref "group" (include "kvgate.poolGroup" .) -}}
{{- end -}}
{{- $pool := dict "name" (include "kvgate.poolName" .) "inference_pool" $ref -}}
{{- with $ie.models -}}
{{- $_ := set $pool "models" . -}}
{{- end -}}
{{- with $ie.scheduler -}}
{{- $_ := set $pool "scheduler" . -}}
{{- end -}}
{{- $pool = merge $pool (deepCopy (default (dict) $ie.poolConfig)) -}}
{{- $cfg := dict
      "grpc_addr" (printf "0.0.0.0:%d" (int $ie.extProcPort))
      "health_addr" (printf "0.0.0.0:%d" (int $ie.healthPort))
      "admin_addr" (printf "0.0.0.0:%d" (int $ie.metricsPort))
      "pools" (list $pool) -}}
{{- if $ie.proxy.enabled -}}
{{- $_ := set $cfg "proxy_addr" (printf "0.0.0.0:%d" (int $ie.proxy.port)) -}}
{{- end -}}
{{- if include "kvgate.pickerTokenSecret" . -}}
{{- $_ := set $cfg "picker_api" (dict "token_file" (printf "%s/token" (include "kvgate.pickerTokenDir" .))) -}}
{{- end -}}
{{- if include "kvgate.clustered" . -}}
{{- $peers := printf "%s.%s.svc.%s:%d" (include "kvgate.peersService" .) .Release.Namespace $ie.cluster.clusterDomain (int $ie.extProcPort) -}}
{{- $_ := set $cfg "cluster" (dict "dns" $peers "token_file" (printf "%s/token" (include "kvgate.clusterTokenDir" .))) -}}
{{- end -}}
{{- $cfg = merge $cfg (deepCopy (default (dict) $ie.config)) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/*
Checks that fail the render with a message rather than produce objects that cannot work.
*/}}
{{- define "kvgate.validate" -}}
{{- $ie := .Values.inferenceExtension -}}
{{- if not (hasSuffix "/v1" .Values.inferencePool.apiVersion) -}}
{{- fail "inferencePool.apiVersion must be GROUP/v1: kvgate reads v1 InferencePools" -}}
{{- end -}}
{{- $ports := len .Values.inferencePool.targetPorts -}}
{{- if or (lt $ports 1) (gt $ports 8) -}}
{{- fail "inferencePool.targetPorts takes 1 to 8 ports" -}}
{{- end -}}
{{- if and $ie.pickerApi.token.existingSecret $ie.pickerApi.token.create -}}
{{- fail "inferenceExtension.pickerApi.token: name an existingSecret or set create, not both" -}}
{{- end -}}
{{- if and (include "kvgate.pickerTokenSecret" .) (not $ie.pickerApi.token.key) -}}
{{- fail "inferenceExtension.pickerApi.token.key must name the Secret's key holding the token" -}}
{{- end -}}
{{- if and (include "kvgate.clustered" .) (not $ie.cluster.token.key) -}}
{{- fail "inferenceExtension.cluster.token.key must name the Secret's key holding the token" -}}
{{- end -}}
{{- if and (include "kvgate.clustered" .) (not $ie.cluster.clusterDomain) -}}
{{- fail "inferenceExtension.cluster.clusterDomain must be the cluster's DNS domain (cluster.local)" -}}
{{- end -}}
{{- $pdb := $ie.podDisruptionBudget -}}
{{- if and $pdb.enabled (gt (int $ie.replicas) 1) (not (include "kvgate.pdbMinAvailable" .)) (not (include "kvgate.pdbMaxUnavailable" .)) -}}
{{- fail "inferenceExtension.podDisruptionBudget: set maxUnavailable or minAvailable" -}}
{{- end -}}
{{- if le (int $ie.terminationGracePeriodSeconds) (add 30 (int $ie.preStopSleepSeconds)) -}}
{{- fail "inferenceExtension.terminationGracePeriodSeconds must exceed kvgate's 30 s drain plus preStopSleepSeconds" -}}
{{- end -}}
{{- end -}}

{{/*
podDisruptionBudget.minAvailable when set (it then replaces maxUnavailable); empty otherwise.
*/}}
{{- define "kvgate.pdbMinAvailable" -}}
{{- $min := .Values.inferenceExtension.podDisruptionBudget.minAvailable -}}
{{- if not (kindIs "invalid" $min) -}}
{{- toString $min -}}
{{- end -}}
{{- end -}}

{{/*
podDisruptionBudget.maxUnavailable; empty when not set.
*/}}
{{- define "kvgate.pdbMaxUnavailable" -}}
{{- $max := .Values.inferenceExtension.podDisruptionBudget.maxUnavailable -}}
{{- if not (kindIs "invalid" $max) -}}
{{- toString $max -}}
{{- end -}}
{{- end -}}
