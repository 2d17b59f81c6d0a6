{{/* Names ------------------------------------------------------------------------ */}}

{{- define "cadenza.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-cadenza`, or just the release name when it already contains the chart name. */}}
{{- define "cadenza.fullname" -}}
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

{{- define "cadenza.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels --------------------------------------------------------------------------- */}}

{{- define "cadenza.labels" -}}
helm.sh/chart: {{ include "cadenza.chart" . }}
app.kubernetes.io/name: {{ include "cadenza.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cadenza
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component; call with (dict "root" $ "component" "operator"). */}}
{{- define "cadenza.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cadenza.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Full labels of one component; call with (dict "root" $ "component" "operator"). */}}
{{- define "cadenza.componentLabels" -}}
{{ include "cadenza.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Operator ------------------------------------------------------------------------- */}}

{{- define "cadenza.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cadenza.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cadenza.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "cadenza.watchNamespaces" -}}
{{- join "," .Values.watchNamespaces }}
{{- end }}

{{/* NATS ----------------------------------------------------------------------------- */}}

{{- define "cadenza.nats.fullname" -}}
{{- printf "%s-nats" (include "cadenza.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cadenza.nats.headless" -}}
{{- printf "%s-nats-headless" (include "cadenza.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The NATS URL the operator and the test pod use: the bundled server or `nats.url`. */}}
{{- define "cadenza.nats.url" -}}
{{- if .Values.nats.enabled }}
{{- printf "%s://%s.%s.svc.%s:4222" (include "cadenza.nats.scheme" .) (include "cadenza.nats.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- else }}
{{- .Values.nats.url }}
{{- end }}
{{- end }}

{{/* tls when the bundled NATS serves TLS (`nats.tls.enabled`): nats-py then verifies
the server against the CA in CADENZA_NATS_CA. */}}
{{- define "cadenza.nats.scheme" -}}
{{- ternary "tls" "nats" (and .Values.nats.enabled .Values.nats.tls.enabled) }}
{{- end }}

{{/* The kubernetes.io/tls Secret of the bundled NATS when TLS is on, else empty. */}}
{{- define "cadenza.nats.tlsSecret" -}}
{{- if and .Values.nats.enabled .Values.nats.tls.enabled }}
{{- .Values.nats.tls.secretName }}
{{- end }}
{{- end }}

{{- define "cadenza.nats.caDir" -}}
/etc/cadenza/nats-ca
{{- end }}

{{/* CADENZA_NATS_CA, its mount and its volume (ca.crt alone: the server's key stays in
the NATS pods); empty without TLS. */}}
{{- define "cadenza.nats.caEnv" -}}
{{- if include "cadenza.nats.tlsSecret" . }}
- name: CADENZA_NATS_CA
  value: {{ printf "%s/ca.crt" (include "cadenza.nats.caDir" .) | quote }}
{{- end }}
{{- end }}

{{- define "cadenza.nats.caVolumeMount" -}}
{{- if include "cadenza.nats.tlsSecret" . }}
- name: nats-ca
  mountPath: {{ include "cadenza.nats.caDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "cadenza.nats.caVolume" -}}
{{- with include "cadenza.nats.tlsSecret" . }}
- name: nats-ca
  secret:
    secretName: {{ . }}
    defaultMode: 0444
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end }}

{{- define "cadenza.nats.credsDir" -}}
/etc/cadenza/nats
{{- end }}

{{/* The bundled NATS's keys Secret when authentication is on (issue 13), else empty:
`nats.auth.existingSecret`, or the one the install hook makes (templates/nats/auth-init.yaml). */}}
{{- define "cadenza.nats.authSecret" -}}
{{- if and .Values.nats.enabled .Values.nats.auth.enabled }}
{{- .Values.nats.auth.existingSecret | default (printf "%s-nats-auth" (include "cadenza.fullname" .)) }}
{{- end }}
{{- end }}

{{/* The Secret and key of the credential the operator and the test pod connect with:
the engine's from the keys Secret, else `nats.credentialsSecret` (either may be empty). */}}
{{- define "cadenza.nats.credsSecret" -}}
{{- include "cadenza.nats.authSecret" . | default .Values.nats.credentialsSecret.name }}
{{- end }}

{{- define "cadenza.nats.credsKey" -}}
{{- ternary "engine.creds" .Values.nats.credentialsSecret.key (ne (include "cadenza.nats.authSecret" .) "") }}
{{- end }}

{{- define "cadenza.nats.accountDir" -}}
/etc/cadenza/nats-account
{{- end }}

{{/* Env vars and volume mount for the NATS credentials Secret (empty when not set). */}}
{{- define "cadenza.nats.credsEnv" -}}
{{- if include "cadenza.nats.credsSecret" . }}
- name: CADENZA_NATS_CREDS
  value: {{ printf "%s/%s" (include "cadenza.nats.credsDir" $) (include "cadenza.nats.credsKey" $) | quote }}
{{- end }}
{{- end }}

{{- define "cadenza.nats.credsVolumeMount" -}}
{{- if include "cadenza.nats.credsSecret" . }}
- name: nats-creds
  mountPath: {{ include "cadenza.nats.credsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "cadenza.nats.credsVolume" -}}
{{- with include "cadenza.nats.credsSecret" . }}
- name: nats-creds
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: {{ include "cadenza.nats.credsKey" $ }}
        path: {{ include "cadenza.nats.credsKey" $ }}
{{- end }}
{{- end }}

{{/* Checks that values.schema.json cannot express; included by the operator Deployment. */}}
{{- define "cadenza.validate" -}}
{{- if and (not .Values.nats.enabled) (not .Values.nats.url) }}
{{- fail "nats.url is required when nats.enabled is false: set nats.url to your NATS server (nats://host:4222) or set nats.enabled=true for the bundled NATS with JetStream" }}
{{- end }}
{{- if and .Values.nats.enabled .Values.nats.url }}
{{- fail "nats.url and nats.enabled=true are mutually exclusive: set nats.enabled=false to use the NATS at nats.url, or clear nats.url to use the bundled NATS" }}
{{- end }}
{{- if and .Values.nats.enabled .Values.nats.tls.enabled (not .Values.nats.tls.secretName) }}
{{- fail "nats.tls.secretName is required when nats.tls.enabled is true: a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt (e.g. from cert-manager)" }}
{{- end }}
{{- if and .Values.nats.enabled .Values.nats.tls.enabled (not .Values.nats.auth.enabled) }}
{{- fail "nats.tls.enabled needs nats.auth.enabled: each Agent gets the CA in its own credential Secret (<agent>-nats), which the operator writes only with authentication on" }}
{{- end }}
{{- if and .Values.tracing.headersSecret.name (not .Values.tracing.otlpEndpoint) }}
{{- fail "tracing.headersSecret.name is set but tracing.otlpEndpoint is empty: set tracing.otlpEndpoint to the collector's OTLP/HTTP URL (http://collector:4318), or clear tracing.headersSecret.name" }}
{{- end }}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.peering.enabled) }}
{{- fail "operator.replicas > 1 requires operator.peering.enabled=true: without kopf peering every replica would handle every resource" }}
{{- end }}
{{- end }}

{{/* The credentials agent pods mount: agentCredentialsSecret, else credentialsSecret. */}}
{{- define "cadenza.nats.agentCredsEnv" -}}
{{- if include "cadenza.nats.authSecret" . }}
{{- /* The operator mints each Agent its own credential from the account seed. */}}
- name: CADENZA_NATS_ACCOUNT_SEED_FILE
  value: {{ printf "%s/account.nk" (include "cadenza.nats.accountDir" .) | quote }}
{{- else }}
{{- $agents := .Values.nats.agentCredentialsSecret }}
{{- $secret := ternary $agents .Values.nats.credentialsSecret (ne $agents.name "") }}
{{- with $secret.name }}
- name: CADENZA_AGENT_NATS_CREDS_SECRET
  value: {{ . | quote }}
- name: CADENZA_AGENT_NATS_CREDS_KEY
  value: {{ $secret.key | quote }}
{{- end }}
{{- end }}
{{- end }}
