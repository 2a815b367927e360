"""The Kubernetes runtime: pods and EndpointSlices as the topology, service-account tokens as credentials,
run by a kopf operator (`lockgate operator`) in each cluster."""
