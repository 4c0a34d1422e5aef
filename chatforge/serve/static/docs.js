// /docs: start Swagger UI on this server's schema. No validator badge (it would call another site)
// and nothing else from other origins: the page's CSP would refuse it anyway.
"use strict";

window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
});
