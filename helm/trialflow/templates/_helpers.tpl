{{/*
The components of the pipeline: one Deployment each, same image, own subcommand. `kind` decides
which settings a component gets (see "trialflow.env"): http (a listener and a Service), relay,
consumer (`trialflow consume <consumer>`). The names and commands follow `trialflow services`.
*/}}
{{- define "trialflow.componentTable" -}}
- {key: siteApi, name: site-api, kind: http, args: [site-api], listenEnv: SITE_API_LISTEN, tokensKey: siteApiTokensKey, tokensEnv: SITE_API_TOKENS, database: true}
- {key: eproGateway, name: epro-gateway, kind: http, args: [epro-gateway], listenEnv: EPRO_GATEWAY_LISTEN, tokensKey: eproGatewayTokensKey, tokensEnv: EPRO_GATEWAY_TOKENS, kafka: true, producer: true}
- {key: alertApi, name: alert-api, kind: http, args: [alert-api], listenEnv: ALERT_API_LISTEN, tokensKey: alertApiTokensKey, tokensEnv: ALERT_API_TOKENS, database: true}
- {key: relay, name: relay, kind: relay, args: [relay], database: true, kafka: true, producer: true}
- {key: enrollment, name: enrollment, kind: consumer, consumer: enrollment, args: [consume, enrollment], database: true, kafka: true}
- {key: kitAllocation, name: kit-allocation, kind: consumer, consumer: kit-allocation, args: [consume, kit-allocation], database: true, kafka: true}
- {key: eproValidation, name: epro-validation, kind: consumer, consumer: epro-validation, args: [consume, epro-validation], database: true, kafka: true}
- {key: monitoring, name: monitoring, kind: consumer, consumer: monitoring, args: [consume, monitoring], database: true, kafka: true}
- {key: notifier, name: notifier, kind: consumer, consumer: notifier, args: [consume, notifier], database: true, kafka: true}
- {key: risk, name: risk, kind: consumer, consumer: risk, args: [consume, risk], database: true, kafka: true}
{{- end -}}

{{/* The enabled components, each with its values merged in as `.values`. */}}
{{- define "trialflow.components" -}}
{{- $out := list -}}
{{- range $c := (include "trialflow.componentTable" . | fromYamlArray) -}}
{{- $values := index $.Values.components $c.key -}}
{{- if $values.enabled -}}
{{- $out = append $out (merge (dict "values" $values) $c) -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{- define "trialflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "trialflow.fullname" -}}
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

{{/* `<fullname>-<component>`, at most 63 characters. Call with (list $ "relay"). */}}
{{- define "trialflow.componentName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "trialflow.fullname" $root | trunc 45 | trimSuffix "-") (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "trialflow.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "trialflow.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "trialflow.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "trialflow.selectorLabels" . }}
app.kubernetes.io/part-of: trialflow
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- end -}}

{{- define "trialflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "trialflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "trialflow.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* `key=value` pairs of a map, sorted by key, for KAFKA_*CONFIG. */}}
{{- define "trialflow.settings" -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}
{{- $pairs = append $pairs (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* KAFKA_CONFIG: the connection's security, then `kafka.config`. */}}
{{- define "trialflow.kafkaConfig" -}}
{{- $k := .Values.kafka -}}
{{- $pairs := list -}}
{{- if and $k.tls.enabled $k.sasl.enabled -}}
{{- $pairs = append $pairs "security.protocol=SASL_SSL" -}}
{{- else if $k.sasl.enabled -}}
{{- $pairs = append $pairs "security.protocol=SASL_PLAINTEXT" -}}
{{- else if $k.tls.enabled -}}
{{- $pairs = append $pairs "security.protocol=SSL" -}}
{{- end -}}
{{- if $k.sasl.enabled -}}
{{- $pairs = append $pairs (printf "sasl.mechanism=%s" $k.sasl.mechanism) -}}
{{- $pairs = append $pairs "sasl.username=$(SASL_USERNAME)" -}}
{{- $pairs = append $pairs "sasl.password=$(SASL_PASSWORD)" -}}
{{- end -}}
{{- if $k.tls.enabled -}}
{{- $pairs = append $pairs "ssl.ca.location=/etc/trialflow/kafka-tls/ca.crt" -}}
{{- if $k.tls.certKey -}}
{{- $pairs = append $pairs "ssl.certificate.location=/etc/trialflow/kafka-tls/tls.crt" -}}
{{- $pairs = append $pairs "ssl.key.location=/etc/trialflow/kafka-tls/tls.key" -}}
{{- end -}}
{{- end -}}
{{- with $k.config -}}
{{- $pairs = append $pairs (include "trialflow.settings" .) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{- define "trialflow.secretEnv" -}}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ index . 1 }}
      key: {{ index . 2 }}
{{- end -}}

{{/*
The environment of a component: exactly the variables its subcommand reads (the chart/code drift
test, trialflow/tests/helm_chart.rs, runs `trialflow config check` on every container with it).
Call with (dict "root" $ "c" $component); jobs pass a component of kind `migrate` or `topics`.
*/}}
{{- define "trialflow.env" -}}
{{- $root := .root -}}
{{- $c := .c -}}
{{- $v := $root.Values -}}
{{- $secret := required "secrets.existingSecret: name the Secret holding DATABASE_URL and the other secrets" $v.secrets.existingSecret -}}
- name: LOG_FORMAT
  value: {{ $v.logFormat | quote }}
- name: METRICS_ADDR
  value: {{ printf "0.0.0.0:%v" $v.metricsPort | quote }}
- name: SHUTDOWN_GRACE_SECS
  value: {{ $v.shutdownGraceSecs | quote }}
{{- with $v.logLevel }}
- name: RUST_LOG
  value: {{ . | quote }}
{{- end }}
{{- with $v.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "trialflow-%s" $c.name | quote }}
{{- end }}
{{- if $c.database }}
{{ include "trialflow.secretEnv" (list "DATABASE_URL" $secret $v.secrets.databaseUrlKey) }}
{{- with $v.database }}
{{- if not (kindIs "invalid" .statementTimeoutMs) }}
- name: DATABASE_STATEMENT_TIMEOUT_MS
  value: {{ .statementTimeoutMs | quote }}
{{- end }}
{{- if not (kindIs "invalid" .idleInTransactionTimeoutMs) }}
- name: DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS
  value: {{ .idleInTransactionTimeoutMs | quote }}
{{- end }}
{{- if not (kindIs "invalid" .tcpKeepaliveSecs) }}
- name: DATABASE_TCP_KEEPALIVE_SECS
  value: {{ .tcpKeepaliveSecs | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if $c.kafka }}
- name: KAFKA_BOOTSTRAP_SERVERS
  value: {{ $v.kafka.bootstrapServers | quote }}
{{- if $v.kafka.sasl.enabled }}
{{- $saslSecret := required "kafka.sasl.existingSecret: name the Secret holding the SASL username and password" $v.kafka.sasl.existingSecret }}
{{- /* Referenced as $(SASL_...) in KAFKA_CONFIG: Kubernetes expands them there. */}}
{{ include "trialflow.secretEnv" (list "SASL_USERNAME" $saslSecret $v.kafka.sasl.usernameKey) }}
{{ include "trialflow.secretEnv" (list "SASL_PASSWORD" $saslSecret $v.kafka.sasl.passwordKey) }}
{{- end }}
{{- with (include "trialflow.kafkaConfig" $root) }}
- name: KAFKA_CONFIG
  value: {{ . | quote }}
{{- end }}
{{- if and $c.producer $v.kafka.producerConfig }}
- name: KAFKA_PRODUCER_CONFIG
  value: {{ include "trialflow.settings" $v.kafka.producerConfig | quote }}
{{- end }}
{{- if and (eq $c.kind "consumer") $v.kafka.consumerConfig }}
- name: KAFKA_CONSUMER_CONFIG
  value: {{ include "trialflow.settings" $v.kafka.consumerConfig | quote }}
{{- end }}
{{- end }}
{{- if and (has $c.kind (list "http" "consumer" "topics")) $v.kafka.topicPrefix }}
- name: TOPIC_PREFIX
  value: {{ $v.kafka.topicPrefix | quote }}
{{- end }}
{{- if has $c.kind (list "consumer" "topics") }}
- name: CONSUMER_DLQ_SUFFIX
  value: {{ $v.kafka.dlqSuffix | quote }}
{{- end }}
{{- if eq $c.kind "http" }}
- name: {{ $c.listenEnv }}
  value: {{ printf "0.0.0.0:%v" $c.values.port | quote }}
{{- with (index $v.secrets $c.tokensKey) }}
{{ include "trialflow.secretEnv" (list $c.tokensEnv $secret .) }}
{{- end }}
{{- with $v.oidc }}
{{- if .issuer }}
- name: OIDC_ISSUER
  value: {{ .issuer | quote }}
- name: OIDC_AUDIENCE
  value: {{ required "oidc.audience is required with oidc.issuer" .audience | quote }}
- name: OIDC_JWKS
  value: {{ required "oidc.jwks is required with oidc.issuer" .jwks | quote }}
{{- range $var, $claim := dict "OIDC_USER_CLAIM" .userClaim "OIDC_ROLE_CLAIM" .roleClaim "OIDC_STUDIES_CLAIM" .studiesClaim "OIDC_SITES_CLAIM" .sitesClaim }}
{{- if $claim }}
- name: {{ $var }}
  value: {{ $claim | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- with $v.httpLimits }}
{{- if not (kindIs "invalid" .ratePerPrincipal) }}
- name: HTTP_RATE_LIMIT_PER_PRINCIPAL
  value: {{ .ratePerPrincipal | quote }}
{{- end }}
{{- if not (kindIs "invalid" .ratePerAddress) }}
- name: HTTP_RATE_LIMIT_PER_ADDRESS
  value: {{ .ratePerAddress | quote }}
{{- end }}
{{- if not (kindIs "invalid" .requestTimeoutMs) }}
- name: HTTP_REQUEST_TIMEOUT_MS
  value: {{ .requestTimeoutMs | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq $c.kind "relay" }}
- name: OUTBOX_SOURCES
  value: {{ join "," $c.values.sources | quote }}
- name: OUTBOX_EXACTLY_ONCE
  value: {{ $c.values.exactlyOnce | quote }}
{{- end }}
{{- if and (eq $c.name "notifier") $v.secrets.notifierSubscriptionsKey }}
{{ include "trialflow.secretEnv" (list "NOTIFIER_SUBSCRIPTIONS" $secret $v.secrets.notifierSubscriptionsKey) }}
{{- end }}
{{- if and (eq $c.name "monitoring") $c.values.rulesConfigMap }}
- name: MONITORING_RULES_DIR
  value: /etc/trialflow/monitoring-rules
{{- end }}
{{- /* The alert API's dashboard draws the thresholds the monitoring and risk services use. */}}
{{- if and (eq $c.name "alert-api") $v.components.monitoring.rulesConfigMap }}
- name: MONITORING_RULES_DIR
  value: /etc/trialflow/monitoring-rules
{{- end }}
{{- if and (eq $c.name "alert-api") $v.components.risk.configMap }}
- name: RISK_CONFIG_DIR
  value: /etc/trialflow/risk
{{- end }}
{{- if and (eq $c.name "epro-validation") $c.values.configMap }}
- name: EPRO_CONFIG_DIR
  value: /etc/trialflow/epro
{{- end }}
{{- if and (eq $c.name "risk") $c.values.configMap }}
- name: RISK_CONFIG_DIR
  value: /etc/trialflow/risk
{{- end }}
{{- /* The risk service's ePRO compliance counts the occurrences of the ePRO service's schedules. */}}
{{- if and (eq $c.name "risk") $v.components.eproValidation.configMap }}
- name: EPRO_CONFIG_DIR
  value: /etc/trialflow/epro
{{- end }}
{{- if eq $c.kind "topics" }}
- name: TOPIC_PARTITIONS
  value: {{ $v.topics.partitions | quote }}
- name: TOPIC_REPLICATION_FACTOR
  value: {{ $v.topics.replicationFactor | quote }}
{{- if not (kindIs "invalid" $v.topics.minInsyncReplicas) }}
- name: TOPIC_MIN_INSYNC_REPLICAS
  value: {{ $v.topics.minInsyncReplicas | quote }}
{{- end }}
{{- end }}
{{- range $name, $value := (($c.values).env) }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* Volumes of a component's pod: a writable /tmp, the Kafka TLS files, its ConfigMaps. */}}
{{- define "trialflow.volumes" -}}
{{- $root := .root -}}
{{- $c := .c -}}
- name: tmp
  emptyDir: {sizeLimit: 64Mi}
{{- if and $c.kafka $root.Values.kafka.tls.enabled }}
{{- $tls := $root.Values.kafka.tls }}
- name: kafka-tls
  secret:
    secretName: {{ required "kafka.tls.existingSecret: name the Secret holding the CA certificate" $tls.existingSecret }}
    defaultMode: 0440
    items:
      - {key: {{ $tls.caKey }}, path: ca.crt}
      {{- if $tls.certKey }}
      - {key: {{ $tls.certKey }}, path: tls.crt}
      - {key: {{ required "kafka.tls.keyKey is required with kafka.tls.certKey" $tls.keyKey }}, path: tls.key}
      {{- end }}
{{- end }}
{{- if and $c.database $root.Values.database.caSecret }}
- name: postgres-ca
  secret:
    secretName: {{ $root.Values.database.caSecret }}
    defaultMode: 0440
    items:
      - {key: {{ $root.Values.database.caKey }}, path: ca.crt}
{{- end }}
{{- if and (eq $c.name "monitoring") $c.values.rulesConfigMap }}
- name: monitoring-rules
  configMap:
    name: {{ $c.values.rulesConfigMap }}
{{- end }}
{{- if and (eq $c.name "alert-api") $root.Values.components.monitoring.rulesConfigMap }}
- name: monitoring-rules
  configMap:
    name: {{ $root.Values.components.monitoring.rulesConfigMap }}
{{- end }}
{{- if and (eq $c.name "alert-api") $root.Values.components.risk.configMap }}
- name: risk-config
  configMap:
    name: {{ $root.Values.components.risk.configMap }}
{{- end }}
{{- if and (eq $c.name "epro-validation") $c.values.configMap }}
- name: epro-config
  configMap:
    name: {{ $c.values.configMap }}
{{- end }}
{{- if and (eq $c.name "risk") $c.values.configMap }}
- name: risk-config
  configMap:
    name: {{ $c.values.configMap }}
{{- end }}
{{- if and (eq $c.name "risk") $root.Values.components.eproValidation.configMap }}
- name: epro-config
  configMap:
    name: {{ $root.Values.components.eproValidation.configMap }}
{{- end }}
{{- end -}}

{{- define "trialflow.volumeMounts" -}}
{{- $root := .root -}}
{{- $c := .c -}}
- {name: tmp, mountPath: /tmp}
{{- if and $c.kafka $root.Values.kafka.tls.enabled }}
- {name: kafka-tls, mountPath: /etc/trialflow/kafka-tls, readOnly: true}
{{- end }}
{{- if and $c.database $root.Values.database.caSecret }}
- {name: postgres-ca, mountPath: /etc/trialflow/postgres, readOnly: true}
{{- end }}
{{- if and (eq $c.name "monitoring") $c.values.rulesConfigMap }}
- {name: monitoring-rules, mountPath: /etc/trialflow/monitoring-rules, readOnly: true}
{{- end }}
{{- if and (eq $c.name "alert-api") $root.Values.components.monitoring.rulesConfigMap }}
- {name: monitoring-rules, mountPath: /etc/trialflow/monitoring-rules, readOnly: true}
{{- end }}
{{- if and (eq $c.name "alert-api") $root.Values.components.risk.configMap }}
- {name: risk-config, mountPath: /etc/trialflow/risk, readOnly: true}
{{- end }}
{{- if and (eq $c.name "epro-validation") $c.values.configMap }}
- {name: epro-config, mountPath: /etc/trialflow/epro, readOnly: true}
{{- end }}
{{- if and (eq $c.name "risk") $c.values.configMap }}
- {name: risk-config, mountPath: /etc/trialflow/risk, readOnly: true}
{{- end }}
{{- if and (eq $c.name "risk") $root.Values.components.eproValidation.configMap }}
- {name: epro-config, mountPath: /etc/trialflow/epro, readOnly: true}
{{- end }}
{{- end -}}

{{/* Scheduling settings: the component's own, else the chart-wide ones. */}}
{{- define "trialflow.scheduling" -}}
{{- $root := .root -}}
{{- $values := .c.values | default dict -}}
{{- with (default $root.Values.nodeSelector $values.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.Values.tolerations $values.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.Values.affinity $values.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}
